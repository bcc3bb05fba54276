import json
import math
import os
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bdm_cli.checkpoint import load_checkpoint
from bdm_cli.cli import app
from bdm_cli.config import list_presets, load_config
from bdm_cli.data import make_dataset
from bdm_cli.runtime import bf16_native, bf16_network
from bdm_cli.train import StepBatches, lr_at, train
from bdm_cli.unet import build_model, count_parameters

from .conftest import ROOT, shared_file

runner = CliRunner()


def test_lr_warmup():
    assert lr_at(0, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(9, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(500, 1e-3, 10) == 1e-3 and lr_at(0, 1e-3, 0) == 1e-3


def test_step_batches_resume_and_ranks():
    full = list(StepBatches(20, 4, seed=3, start=0, steps=12))
    assert list(StepBatches(20, 4, seed=3, start=7, steps=12)) == full[7:]
    assert all(len(b) == 4 for b in full) and sorted(sum(full[:5], [])) == list(range(20))  # one epoch: a permutation
    r0, r1 = list(StepBatches(20, 4, 3, 0, 12, 0, 2)), list(StepBatches(20, 4, 3, 0, 12, 1, 2))
    assert [sorted(a + b) for a, b in zip(r0, r1)] == [sorted(b) for b in full]


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_preset_builds_its_model(name):
    cfg = load_config(name)
    model = build_model(cfg)
    assert count_parameters(model) > 0
    if cfg.data.resolution <= 32:
        x = torch.randn(2, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        assert model(x, torch.rand(2)).shape == x.shape


def test_unet_non_square_and_zero_init_output():
    cfg = load_config("tiny")
    from bdm_cli.unet import UNet

    net = UNet(3, 8, cfg.model)
    x = torch.randn(2, 3, 8, 12)
    assert net(x, torch.rand(2)).shape == x.shape


@pytest.mark.parametrize("shape, groups", [((4, 64, 8, 8), 32), ((2, 6, 5, 7), 3), ((3, 32, 1, 6), 1)])
def test_channels_last_group_norm_matches_pytorch(shape, groups):
    """The layout-keeping norm of CUDA channels_last runs (unet.group_norm_nhwc) against F.group_norm in float64:
    values and all three gradients, and the output stays channels_last."""
    from bdm_cli.unet import group_norm_nhwc

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in (shape, shape[1:2], shape[1:2]))
    ref_args = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
    ours = [x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_(),
            w.detach().float().requires_grad_(), b.detach().float().requires_grad_()]
    ref = torch.nn.functional.group_norm(ref_args[0], groups, ref_args[1], ref_args[2], 1e-5)
    y = group_norm_nhwc(ours[0], groups, ours[1], ours[2], 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    (ref * gy).sum().backward()
    (y * gy.float()).sum().backward()
    assert (y.double() - ref).abs().max() < 1e-5
    for a, r in zip(ours, ref_args):
        assert (a.grad.double() - r.grad).abs().max() < 1e-4 * max(1.0, r.grad.abs().max().item())


def test_attention_is_layout_independent():
    """AttnBlock gives the same output for NCHW and channels_last inputs, and keeps channels_last."""
    from bdm_cli.unet import AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(64, 4)
    torch.nn.init.normal_(block.proj.weight)  # zero-initialised: the block would be the identity
    x = torch.randn(2, 64, 4, 6)
    y_cl = block(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, block(x), atol=1e-5, rtol=1e-5)


def test_training_lowers_the_loss(tmp_path):
    cfg = load_config("tiny", ["train.steps=60", "train.log_every=20", "train.lr=2e-3", "model.precondition=false"])
    losses = []
    train(cfg, tmp_path, progress=lambda d: losses.append(d["loss"]) if "loss" in d else None)
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8, losses
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60]
    assert (tmp_path / "samples" / "final.png").exists() and (tmp_path / "config.yaml").exists()


def test_resume_is_bit_exact(tmp_path):
    # Dropout on, so the global RNG matters too.
    over = ["train.steps=10", "model.dropout=0.2", "train.checkpoint_every=0"]
    straight = train(load_config("tiny", over), tmp_path / "a")
    half = load_config("tiny", over[1:] + ["train.steps=5"])
    train(half, tmp_path / "b")
    resumed = train(load_config("tiny", over), tmp_path / "b", resume=True)
    assert resumed["step"] == 10
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = straight["ema"].state_dict(), resumed["ema"].state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    state = load_checkpoint(tmp_path / "b")  # weights_only=True inside
    assert state["step"] == 10


def test_cli_train_and_resume(tmp_path):
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(run), "--steps", "4"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "--preset", "tiny", "--out", str(run)])
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, ["train", "--resume", str(run), "--steps", "6"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two(script, run_dir) -> subprocess.CompletedProcess:
    """``script run_dir`` in two CPU processes under torchrun."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", env["MASTER_PORT"], str(script), str(run_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _same_weights_on_both_ranks(run_dir) -> None:
    """The rank{0,1}.pt that a _torchrun_two script saved hold the same weights."""
    w0, w1 = torch.load(run_dir / "rank0.pt"), torch.load(run_dir / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_ddp_two_cpu_processes_keep_identical_weights(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        "import os, sys, torch\n"
        "from bdm_cli.config import load_config\n"
        "from bdm_cli.train import train\n"
        "cfg = load_config('tiny', ['train.steps=4', 'train.batch_size=8', 'train.device=cpu'])\n"
        "r = train(cfg, sys.argv[1])\n"
        "torch.save(r['model'].state_dict(), os.path.join(sys.argv[1], f\"rank{os.environ['RANK']}.pt\"))\n"
        "assert r['world'] == 2\n"
        "assert not torch.distributed.is_initialized()  # ended: a live gloo group aborted 1 exit in 10\n"
    )
    proc = _torchrun_two(script, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_weights_on_both_ranks(tmp_path / "run")
    single = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert single["step"] == 4 and len(single["rng"]["gen"]) == 2


def test_ddp_a_signal_to_one_process_stops_all_with_a_checkpoint(tmp_path):
    """A SIGTERM sent to rank 1 alone (a targeted kill) stopped it alone: rank 0's next gradient all-reduce failed
    with a gloo traceback and no checkpoint was written. The ranks agree on a stop every STOP_EVERY steps."""
    from bdm_cli.train import STOP_EVERY

    script = tmp_path / "ddp.py"
    script.write_text(
        "import os, signal, sys, torch\n"
        "import bdm_cli.train as T\n"
        "from bdm_cli.config import load_config\n"
        "real = T.lr_at\n"
        "def lr_at(step, *a):\n"
        "    if step == 3 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(step, *a)\n"
        "T.lr_at = lr_at\n"
        "cfg = load_config('tiny', ['train.steps=100', 'train.batch_size=8', 'train.device=cpu'])\n"
        "r = T.train(cfg, sys.argv[1])\n"
        "assert r['interrupted'] and r['stopped_by'] == 'SIGTERM', r\n"
        "print('stopped at', r['step'])\n"
    )
    proc = _torchrun_two(script, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"stopped at {STOP_EVERY}") == 2, proc.stdout
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == STOP_EVERY


def test_ddp_a_rank_that_reads_nothing_of_its_share_stays_in_step(tmp_path):
    """A rank whose whole share of a batch could not be decoded skipped the step alone: its collectives fell out of
    step with the other rank's (gloo aborted with a traceback). It now steps on a stand-in, and no rank applies it.
    Skipped steps were counted once per rank, and unread images only by the rank that met them."""
    script = tmp_path / "unread.py"
    script.write_text(
        "import os, sys, torch\n"
        "import bdm_cli.train as T\n"
        "from bdm_cli.config import load_config\n"
        "real, calls = T.collate_valid, []\n"
        "def collate(batch):\n"
        "    calls.append(len(batch) == 4)  # a training batch's share (data_stats reads 500 at a time)\n"
        "    return torch.empty(0) if os.environ['RANK'] == '1' and sum(calls) == 3 and calls[-1] else real(batch)\n"
        "T.collate_valid = collate\n"
        "loss, losses = T.eps_loss, []\n"
        "def nan_once(*a, **k):  # rank 0's fifth step: a non-finite loss, skipped by both ranks and counted once\n"
        "    losses.append(1)\n"
        "    value = loss(*a, **k)\n"
        "    return value * float('nan') if os.environ['RANK'] == '0' and len(losses) == 5 else value\n"
        "T.eps_loss = nan_once\n"
        "cfg = load_config('tiny', ['train.steps=6', 'train.batch_size=8', 'train.device=cpu', 'data.num_workers=0',\n"
        "                           'train.skip_nonfinite=true'])\n"
        "r = T.train(cfg, sys.argv[1])\n"
        "torch.save(r['model'].state_dict(), os.path.join(sys.argv[1], f\"rank{os.environ['RANK']}.pt\"))\n"
        "print('done', r['step'], r['skipped_batches'], r['skipped_images'])\n"
    )
    proc = _torchrun_two(script, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done 6 2 4") == 2, proc.stdout  # both ranks count the two steps, and rank 1's 4 images
    _same_weights_on_both_ranks(tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_batches"] == 2 and logged[-1]["skipped_images"] == 4


def test_peer_lost_is_a_collective_failure_not_this_ranks_own():
    from bdm_cli.train import _first_line, peer_lost

    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:23217. This is typically caused by a remote worker crashing. GLHF!")
    assert peer_lost(gloo) and _first_line(gloo) == "Connection closed by peer [127.0.0.1]:23217"
    assert peer_lost(torch.distributed.DistNetworkError("store gone"))
    assert not peer_lost(RuntimeError("NCCL error: CUDA out of memory")) and not peer_lost(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("how", ["error", "signal"])
def test_ddp_a_rank_that_stops_in_start_up_ends_the_others_with_one_line(tmp_path, how):
    """Rank 1 failing (its own error) or stopped by a signal sent to it alone, before the first step: rank 0's first
    collective failed with a gloo traceback. Launched by hand (no torchrun agent to kill rank 0 first); torchrun's
    SIGTERM, which came as rank 0's error was on its way out, made it print only "Interrupted.", sent here by hand."""
    stop = "raise UserError('rank one cannot go on')" if how == "error" else "os.kill(os.getpid(), signal.SIGTERM)"
    script = tmp_path / "startup.py"
    script.write_text(
        "import os, signal, sys\n"
        "import bdm_cli.train as T\n"
        "from bdm_cli.errors import UserError\n"
        "real = T.data_stats\n"
        "def stats(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        f"        {stop}\n"
        "    return real(*a, **k)\n"
        "T.data_stats = stats\n"
        "end = T.dist.destroy_process_group\n"
        "def destroy():  # torchrun's SIGTERM to the ranks left, as rank 0's error is on its way out\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    end()\n"
        "T.dist.destroy_process_group = destroy\n"
        "from bdm_cli.cli import run\n"
        "sys.argv = ['bdm', 'train', '--preset', 'tiny', '--out', sys.argv[1], '--set', 'train.device=cpu']\n"
        "run()\n"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, str(script), str(run_dir)], env={**env, "RANK": r, "LOCAL_RANK": r},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ("0", "1")]
    (out0, err0), (out1, err1) = (p.communicate(timeout=300) for p in procs)
    assert (procs[1].returncode, procs[0].returncode) == ((1, 1) if how == "error" else (143, 1)), err0 + err1
    assert ("Error: rank one cannot go on" if how == "error" else "Interrupted.") in err1 + out1
    assert "Error: another process of this run stopped or failed" in err0 and "no checkpoint was written" in err0, err0
    assert "Traceback" not in err0 + err1, err0 + err1
    assert not run_dir.exists()  # a new run that never reached a checkpoint leaves no folder


def test_a_rank_that_does_not_answer_in_gloos_time_is_named_so(tmp_path):
    """gloo's timeout (30 minutes; 2 s here) for a rank that hangs: the waiting rank said the other "stopped or
    failed (its own message says why)", and that one had no message."""
    script = tmp_path / "slow.py"
    script.write_text(
        "import datetime, os, sys, time\n"
        "import bdm_cli.train as T\n"
        "join = T.dist.init_process_group\n"
        "T.dist.init_process_group = lambda backend: join(backend, timeout=datetime.timedelta(seconds=2))\n"
        "real = T.data_stats\n"
        "def stats(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        time.sleep(8)  # a rank stuck on a file system\n"
        "    return real(*a, **k)\n"
        "T.data_stats = stats\n"
        "from bdm_cli.cli import run\n"
        "sys.argv = ['bdm', 'train', '--preset', 'tiny', '--out', sys.argv[1], '--set', 'train.device=cpu']\n"
        "run()\n"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env={**env, "RANK": r, "LOCAL_RANK": r},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ("0", "1")]
    (_, err0), (_, err1) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 1 and "Error: another process of this run did not answer in time" in err0, err0
    assert "Timed out" in err0 and "Traceback" not in err0 + err1, err0 + err1


@pytest.mark.parametrize("checkpointed", [True, False])
def test_a_rank_waiting_for_a_frozen_one_stops_on_a_second_signal(tmp_path, checkpointed):
    """Rank 1 frozen (SIGSTOP: Ctrl-Z, a hung file system) held rank 0 inside a collective, deaf to its signals, for
    gloo's 30 minutes. Rank 0 now says why its stop waits, and a second signal ends it at once with one line, its
    checkpoint whole (before the first one: no run files left, which blocked the same command); rank 1, resumed,
    stops with its own line."""
    import signal
    import time

    script = tmp_path / "frozen.py"
    script.write_text(
        "import sys\n"
        "import bdm_cli.train as T\n"
        "T.NOTE_AFTER = 1.0\n"
        "from bdm_cli.cli import run\n"
        "sys.argv = ['bdm', 'train', '--preset', 'tiny', '--out', sys.argv[1], '--steps', '100000', '--set', 'train.device=cpu',\n"
        f"            '--set', 'train.checkpoint_every={2 if checkpointed else 0}', '--set', 'train.sample_every=0',\n"
        "            '--set', 'train.log_every=1']\n"
        "run()\n"
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "run"
    logs = [tmp_path / f"rank{r}.txt" for r in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(script), str(run_dir)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=open(logs[r], "w")) for r in (0, 1)]

    def wait_for(condition, seconds):
        end = time.monotonic() + seconds
        while not condition() and time.monotonic() < end:
            time.sleep(0.2)
        return condition()

    try:
        started = (run_dir / "checkpoint.pt") if checkpointed else (run_dir / "metrics.jsonl")
        assert wait_for(lambda: started.is_file() and started.stat().st_size > 0, 240), logs[0].read_text()
        procs[1].send_signal(signal.SIGSTOP)
        time.sleep(1.0)
        procs[0].send_signal(signal.SIGTERM)
        assert wait_for(lambda: "Stopping: rank 0 waits" in logs[0].read_text(), 30), logs[0].read_text()
        assert procs[0].poll() is None  # a stop waits for a step of all processes: one signal alone does not end it
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=30) == 128 + signal.SIGTERM
        procs[1].send_signal(signal.SIGCONT)
        assert procs[1].wait(timeout=120) == 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    err0, err1 = (log.read_text() for log in logs)
    assert "Error: stopped by a second SIGTERM inside a step, waiting for another process of this run" in err0, err0
    assert "Error: another process of this run stopped or failed" in err1, err1
    assert "Traceback" not in err0 + err1, err0 + err1
    if checkpointed:
        assert load_checkpoint(run_dir / "checkpoint.pt")["step"] % 2 == 0
    else:
        assert "no checkpoint was written yet" in err0 and not (run_dir.exists() and list(run_dir.iterdir()))


def test_a_signal_during_the_last_checkpoint_waits_for_it(tmp_path):
    """A Ctrl-C after the loop (in the final log, settle or checkpoint) raised inside them: under torchrun inside a
    rank's all_gather, and a new run without an earlier checkpoint lost its folder. It now waits for the checkpoint."""
    script = tmp_path / "last.py"
    script.write_text(
        "import os, signal, sys\n"
        "import bdm_cli.train as T\n"
        "from bdm_cli.config import load_config\n"
        "real = T.save_checkpoint\n"
        "def save(path, state):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # as the final checkpoint is written\n"
        "    return real(path, state)\n"
        "T.save_checkpoint = save\n"
        "cfg = load_config('tiny', ['train.steps=3', 'train.checkpoint_every=0', 'train.sample_every=0'])\n"
        "r = T.train(cfg, sys.argv[1])\n"
        "print('ended at', r['step'])\n"
    )
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ended at 3" in proc.stdout, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3


def _write_images(folder, n=6, size=(20, 14), mode="RGB"):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
        Image.fromarray(arr).convert(mode).save(folder / f"{i}.png")


def test_folder_and_zip_datasets(tmp_path, monkeypatch):
    _write_images(tmp_path / "imgs" / "train" / "a", 5)
    _write_images(tmp_path / "imgs" / "test", 3, mode="L")
    folder = make_dataset(str(tmp_path / "imgs"), 8, 3, "train")
    assert len(folder) == 5 and folder[0].shape == (3, 8, 8) and -1 <= folder[0].min() and folder[0].max() <= 1
    assert len(make_dataset(str(tmp_path / "imgs"), 8, 3, "")) == 8
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in (tmp_path / "imgs").rglob("*.png"):
            z.write(p, "root/" + p.relative_to(tmp_path / "imgs").as_posix())
    zipped = make_dataset(str(zpath), 8, 1, "test")
    assert len(zipped) == 3 and zipped[0].shape == (1, 8, 8)
    first = zipped[0]  # the parent opens the zip before the workers fork
    loader = torch.utils.data.DataLoader(zipped, batch_size=1, num_workers=2)
    batches = list(loader)
    assert len(batches) == 3 and torch.equal(batches[0][0], first)
    assert all(torch.equal(b[0], zipped[i]) for i, b in enumerate(batches))
    # A forked worker (another pid) must open its own handle: a shared one shares the file offset,
    # and concurrent reads then return the wrong member (seen: BadZipFile on the CIFAR-10 zip).
    parent_handle = zipped._zip
    monkeypatch.setattr(os, "getpid", lambda: -12345)
    assert torch.equal(zipped[0], first) and zipped._zip is not parent_handle


def test_shared_cifar10_zip_loads():
    path = shared_file("data/cifar10-jpeg.zip")
    train_split = make_dataset(str(path), 32, 3, "train")
    assert len(train_split) == 50000 and train_split[0].shape == (3, 32, 32)
    assert len(make_dataset(str(path), 32, 3, "test")) == 10000


def test_cifar10_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BDM_DATA_DIR", str(tmp_path))
    import torchvision.datasets.utils as u

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(u, "download_url", offline)
    from bdm_cli.data import DataError

    with pytest.raises(DataError, match="cifar10-jpeg.zip"):
        make_dataset("cifar10", 32)


def test_bf16_autocast_only_where_native():
    net = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    cpu = torch.device("cpu")
    assert bf16_network(net, cpu, False) is net
    wrapped = bf16_network(lambda z, t: net(z), cpu, True)
    if bf16_native(cpu):  # AVX-512 BF16 / AMX CPUs: the network runs in bf16, the caller gets bf16 out
        assert wrapped(x, None).dtype == torch.bfloat16
    else:  # emulated bf16 would be slower than float32: left as it is
        assert wrapped(x, None).dtype == torch.float32


def test_bf16_training_step_on_cpu_is_finite_and_resumes_exactly(tmp_path):
    over = ["train.steps=6", "train.bf16=true", "train.checkpoint_every=0"]
    straight = train(load_config("tiny", over), tmp_path / "a")
    train(load_config("tiny", over[1:] + ["train.steps=3"]), tmp_path / "b")
    resumed = train(load_config("tiny", over), tmp_path / "b", resume=True)
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert math.isfinite(straight["loss"]) and all(torch.equal(a[k], b[k]) for k in a)


# -- no host-device synchronisation in the steady state (issue #12) --------------------------------------------

_HOST_READS = ("item", "__bool__", "__float__", "__int__", "cpu", "numpy", "tolist")


def _host_reads(monkeypatch, run) -> int:
    """How many times bdm's own code read a tensor back to the host during ``run()``: on a GPU each is a
    synchronisation. The data pipeline's CPU index lists (StepBatches, data.py) are not device reads."""
    import bdm_cli

    root, counted = os.path.dirname(bdm_cli.__file__), [0]
    exempt = {StepBatches.__iter__.__code__}

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(root) and caller.f_code not in exempt \
                    and not caller.f_code.co_filename.endswith("data.py"):
                counted[0] += 1
            return real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in _HOST_READS:
        wrap(name)
    run()
    monkeypatch.undo()
    return counted[0]


def test_training_steps_never_read_the_device(tmp_path, monkeypatch):
    """8 and 24 steps read the device equally often (only at the final log and checkpoint): the non-finite check,
    the loss sum, the EMA and the optimizer stay on the device between log steps."""
    over = ["train.log_every=1000", "train.checkpoint_every=0", "train.sample_every=0", "model.dropout=0.1"]
    reads = {n: _host_reads(monkeypatch, lambda n=n: train(load_config("tiny", over + [f"train.steps={n}"]),
                                                            tmp_path / str(n)))
             for n in (8, 24)}
    assert reads[8] == reads[24], reads
    assert reads[8] > 0  # the counter sees the final log's reads (a counter that never counts would pass anything)


@pytest.mark.parametrize("sampler", ["ancestral", "unipc"])
def test_sampling_steps_never_read_the_device(tmp_path, monkeypatch, sampler):
    """Sampling reads the device once per batch (the samples), not per step."""
    from bdm_cli.generate import load_run, sample_batches

    train(load_config("tiny", ["train.steps=1", "train.checkpoint_every=0", "train.sample_every=0"]), tmp_path)
    run = load_run(tmp_path / "checkpoint.pt")
    reads = {k: _host_reads(monkeypatch, lambda k=k: list(sample_batches(run, 4, batch_size=2, steps=k, sampler=sampler)))
             for k in (3, 9)}
    assert reads[3] == reads[9] > 0, reads

"""Bad input, interruptions and hostile files, through the real CLI (Typer's runner or a subprocess)."""

import errno
import io
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bdm_cli.checkpoint import load_checkpoint
from bdm_cli.cli import app
from bdm_cli.config import load_config
from bdm_cli.data import load_image, make_dataset

from .conftest import ROOT

runner = CliRunner()
BDM = [sys.executable, "-m", "bdm_cli"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, code=None):
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.output
    return errors[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "tiny"
    assert invoke("train", "--preset", "tiny", "--out", run, "--steps", 2).exit_code == 0
    return run


# -- bad input ---------------------------------------------------------------------------------

def _images(folder: Path, n=4, size=12):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def test_missing_and_empty_inputs(tmp_path):
    one_line_error(invoke("blur-preview", tmp_path / "nope.png"), 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert "no images found" in one_line_error(invoke("train", "--preset", "tiny", "--data", empty, "--out", tmp_path / "r"), 1)
    assert "not found" in one_line_error(invoke("train", "--preset", "tiny", "--data", tmp_path / "nope", "--out", tmp_path / "r2"), 1)
    assert "not found" in one_line_error(invoke("fid", tmp_path / "nope", empty), 1)
    assert "cannot load Inception weights" in one_line_error(invoke("fid", empty, empty, "--inception-weights", __file__), 1)


def test_corrupt_images_are_skipped_with_a_count(tmp_path):
    folder = _images(tmp_path / "imgs", 8)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    good = (folder / "0.png").read_bytes()
    (folder / "trunc.png").write_bytes(good[: len(good) // 2])
    zpath = tmp_path / "imgs.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for p in folder.iterdir():
            z.write(p, p.name)
    for data in (folder, zpath):
        out = tmp_path / f"run_{data.suffix or 'dir'}"
        r = invoke("train", "--preset", "tiny", "--data", data, "--out", out, "--steps", 4, "--batch-size", 10,
                   "--set", "data.channels=3")
        assert r.exit_code == 0, r.output
        assert "skipped images" in r.output
        assert load_checkpoint(out)["step"] == 4


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_image_modes_convert_correctly(tmp_path, mode):
    base = np.zeros((8, 8, 3), np.uint8)
    base[:, :4] = (200, 100, 50)
    img = Image.fromarray(base)
    if mode == "I;16":
        arr = np.full((8, 8), 65535, np.uint16)
        arr[:, :4] = 0
        img = Image.fromarray(arr)  # uint16 -> a 16-bit PNG
        expected = torch.tensor([-1.0, 1.0])  # black left, white right
    elif mode == "RGBA":
        rgba = np.dstack([base, np.full((8, 8), 255, np.uint8)])
        rgba[:, 4:, 3] = 0  # transparent right half -> white
        img = Image.fromarray(rgba)
        expected = None
    else:
        img = img.convert(mode)
        expected = None
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    img.save(path)
    x = load_image(path, 8, 3)
    assert x.shape == (3, 8, 8) and -1 <= x.min() and x.max() <= 1
    if expected is not None:
        assert torch.allclose(x[0, 0, [0, -1]], expected, atol=0.02)
    if mode == "RGBA":
        assert torch.allclose(x[:, 0, -1], torch.ones(3), atol=0.02)
        assert x[0, 0, 0] > x[2, 0, 0]  # the opaque half keeps its colour
    gray = load_image(path, 4, 1)
    assert gray.shape == (1, 4, 4)


def test_huge_image_is_resized_with_bounded_memory(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (6000, 4000), (10, 200, 30)).save(path, quality=80)
    code = ("import resource; from bdm_cli.data import load_image; x = {load}; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def peak_kb(load: str) -> int:
        out = subprocess.run([sys.executable, "-c", code.format(load=load)], env=env, capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    base = peak_kb("None")
    used = peak_kb(f"load_image({str(path)!r}, 32, 3)")
    assert used - base < 30_000, (base, used)  # the decoded image alone would be 72 MB
    assert load_image(path, 32, 3).shape == (3, 32, 32)


@pytest.mark.parametrize("args,code,message", [
    (["--t", "2"], 2, "[0, 1]"),
    (["--t", "x"], 2, "number"),
    (["--preset", "nope"], 2, "unknown preset"),
    (["--set", "train.lr=abc"], 2, "train.lr must be a finite number"),
    (["--set", "train.lrr=1"], 2, "did you mean train.lr"),
    (["--out", "/nonexistent/dir/p.png"], 1, "does not exist"),
])
def test_usage_errors(tmp_path, args, code, message):
    img = _images(tmp_path / "i", 1) / "0.png"
    assert message in one_line_error(invoke("blur-preview", img, *args), code)


def test_yaml_errors_through_the_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  channels: 8\n  dropout: [0.1\n")
    assert "line" in one_line_error(invoke("schedule-plot", "--preset", bad), 2)
    hostile = tmp_path / "hostile.yaml"
    marker = tmp_path / "pwned"
    hostile.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    one_line_error(invoke("schedule-plot", "--preset", hostile), 2)
    assert not marker.exists()


def test_read_only_output_directory(tmp_path):
    img = _images(tmp_path / "i", 1) / "0.png"
    target = Path("/sys/kernel/bdm_test.png")  # sysfs: read-only even for root, unlike a chmod-ed folder
    if not target.parent.is_dir():
        pytest.skip("no /sys/kernel: no directory that stays read-only for root")
    one_line_error(invoke("blur-preview", img, "--out", target), 1)
    assert not target.exists()


@pytest.mark.parametrize("args,message", [(["--n", "0"], "--n must be positive"), (["--n", "-3"], "--n must be positive"),
                                          (["--steps", "0"], "--steps")])
def test_sample_bad_numbers(run_dir, args, message):
    assert message in one_line_error(invoke("sample", "--run", run_dir, *args), 2)


def test_checkpoint_from_another_config(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    msg = one_line_error(invoke("train", "--resume", copy, "--set", "model.channels=16", "--steps", 4), 2)
    assert "cannot change on --resume" in msg  # refused before the weights are loaded (round seven of issue #13)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state["config"]["model"]["channels"] = 16  # a checkpoint whose config and weights disagree
    torch.save(state, copy / "checkpoint.pt")
    msg = one_line_error(invoke("sample", "--checkpoint", copy / "checkpoint.pt", "--out", tmp_path / "g.png"), 1)
    assert "does not fit this model" in msg and "shape" in msg


def test_truncated_and_foreign_checkpoints(run_dir, tmp_path):
    data = (run_dir / "checkpoint.pt").read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    assert "not a readable checkpoint" in one_line_error(invoke("sample", "--checkpoint", trunc), 1)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(3)}, foreign)
    assert "not a bdm checkpoint" in one_line_error(invoke("sample", "--checkpoint", foreign), 1)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    one_line_error(invoke("sample", "--checkpoint", text), 1)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": _Evil(marker)}, evil)
    msg = one_line_error(invoke("sample", "--checkpoint", evil), 1)
    assert "refusing" in msg and not marker.exists()


def test_no_eval_exec_or_unsafe_loading_in_the_source():
    for path in (ROOT / "bdm_cli").rglob("*.py"):
        text = path.read_text()
        for pattern in (r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"yaml\.load\(", r"pickle\.loads?\(", r"weights_only\s*=\s*False", r"shell\s*=\s*True"):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"


# -- nothing is lost -------------------------------------------------------------------------

def _spawn_train(out, *extra, session=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(BDM + ["train", "--preset", "tiny", "--out", str(out), "--steps", "100000",
                                   "--set", "train.log_every=1", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=session)


def _wait_for_steps(out: Path, proc, n=3, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("sig,code,group", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, False), (signal.SIGINT, 130, True),
                                            (signal.SIGHUP, 129, False)])  # SIGHUP: a closed terminal or ssh session
def test_signals_save_a_checkpoint_and_resume(tmp_path, sig, code, group):
    out = tmp_path / "run"
    # group: Ctrl-C in a terminal signals the whole process group, DataLoader workers included
    proc = _spawn_train(out, *(["--set", "data.num_workers=2"] if group else []), session=group)
    try:
        _wait_for_steps(out, proc)
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        output = proc.communicate(timeout=300)[0]
    finally:  # a training that ignored the signal must not outlive the test
        proc.kill()
    assert proc.returncode == code, output
    assert "Traceback" not in output and "checkpoint saved" in output
    step = load_checkpoint(out)["step"]
    assert step >= 3
    r = invoke("train", "--resume", out, "--steps", step + 2)
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out)["step"] == step + 2


def _kill_script(tmp_path, kill_at_save: int, steps: int):
    """Train tiny with a checkpoint every 2 steps; SIGKILL the process in the middle of the given save."""
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal, sys, torch\n"
        "import bdm_cli.checkpoint as ck\n"
        "from bdm_cli.config import load_config\n"
        "from bdm_cli.train import train\n"
        "calls = [0]\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    calls[0] += 1\n"
        f"    if calls[0] == {kill_at_save}:\n"
        "        f.write(b'PK partial checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(obj, f, *a, **k)\n"
        "ck.torch.save = save\n"
        f"cfg = load_config('tiny', ['train.steps={steps}', 'train.checkpoint_every=2', 'model.dropout=0.1'])\n"
        "train(cfg, sys.argv[1])\n"
    )
    return script


def test_kill_during_checkpoint_write_keeps_the_previous_and_resume_is_exact(tmp_path):
    out = tmp_path / "run"
    script = _kill_script(tmp_path, kill_at_save=3, steps=10)  # saves at 2, 4, killed while writing 6
    proc = subprocess.run([sys.executable, str(script), str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(out)["step"] == 4  # the previous checkpoint is intact
    r = invoke("train", "--resume", out)
    assert r.exit_code == 0, r.output
    from bdm_cli.train import train

    straight = train(load_config("tiny", ["train.steps=10", "train.checkpoint_every=2", "model.dropout=0.1"]), tmp_path / "straight")
    resumed = load_checkpoint(out)
    assert resumed["step"] == 10
    assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].state_dict().items())


def test_disk_full_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert invoke("train", "--preset", "tiny", "--out", out, "--steps", 2).exit_code == 0
    good = (out / "checkpoint.pt").read_bytes()
    import bdm_cli.checkpoint as ck

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full)
    msg = one_line_error(invoke("train", "--resume", out, "--steps", 4), 1)
    assert "(the disk is full); the previous checkpoint is kept" in msg
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_nonfinite_loss_stops_or_is_skipped(tmp_path, monkeypatch):
    import bdm_cli.train as tr

    real = tr.eps_loss
    calls = [0]

    def flaky(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls[0] == 3 else loss

    monkeypatch.setattr(tr, "eps_loss", flaky)
    out = tmp_path / "run"
    msg = one_line_error(invoke("train", "--preset", "tiny", "--out", out, "--steps", 6, "--set", "train.checkpoint_every=2"), 1)
    assert "at step 3" in msg
    assert load_checkpoint(out)["step"] == 2  # the last good checkpoint is kept
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out)["model"].values())
    calls[0] = 0
    out2 = tmp_path / "run2"
    r = invoke("train", "--preset", "tiny", "--out", out2, "--steps", 6, "--set", "train.skip_nonfinite=true")
    assert r.exit_code == 0, r.output
    assert "1 skipped batches" in r.output
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out2)["model"].values())


# -- load --------------------------------------------------------------------------------------

def test_sampling_many_images_keeps_memory_flat(run_dir, tmp_path):
    import gc
    import weakref

    from bdm_cli.generate import load_run, sample_batches

    run = load_run(run_dir / "checkpoint.pt")
    refs = []
    for x in sample_batches(run, 10_000, batch_size=500, steps=2, sampler="ddim"):
        refs.append(weakref.ref(x))
        del x
    gc.collect()
    assert len(refs) == 20
    assert all(r() is None for r in refs)  # nothing holds on to a finished batch: memory does not grow with n
    r = invoke("sample", "--run", run_dir, "--n", 3000, "--batch-size", 1000, "--steps", 1, "--sampler", "ddim",
               "--out", tmp_path / "g.png")
    assert r.exit_code == 0 and "first 1024" in r.output  # the grid keeps at most 1024 samples


def test_fid_features_are_streamed():
    import gc
    import weakref

    from bdm_cli import fid

    class Fake(torch.nn.Module):
        def forward(self, x):
            return [x.mean((2, 3), keepdim=True).repeat(1, 22, 1, 1)[:, :64]]

    refs = []

    def batches():
        for _ in range(100):  # 50,000 images of 32x32
            x = torch.rand(500, 3, 32, 32)
            refs.append(weakref.ref(x))
            yield x

    tracemalloc.start()
    st = fid.features(Fake(), batches(), 64, "cpu")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    gc.collect()
    assert st.n == 50_000 and st.rows.shape == (fid.RESERVOIR, 64)
    assert all(r() is None for r in refs)  # no image batch is kept
    # 50,000 feature rows would be 25.6 MB; the running sums are 33 KB and the KID reservoir 10,000 float32 rows, 2.6 MB
    assert peak < 5e6

"""The prepared device check (issue #12): one command on one lent GPU, at most about 7 minutes wall.

On the device machine (the device tool's README; carry ``.whl`` and ``.gpu-data``, about 59 MB)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \\
      && PYTHONPATH=/tmp/site:. python3 bench/gpu.py --out $OUT

``.whl`` holds pytorch-fid, diffusers, denoising-diffusion-pytorch, ema-pytorch and importlib_metadata;
``.gpu-data/cifar10-train.zip`` the 50,000 training JPEGs cut from ../shared/data/cifar10-jpeg.zip (``make gpu-carry``
makes both). Here, ``python bench/gpu.py --smoke`` runs every part on the
CPU at the tiny preset in a minute or two (tests/test_bench_gpu.py, in ``make test``), so the script cannot rot
between GPU sessions; ``make gpu-check`` is the same smoke run.

Parts, in this order; each is timed and fails alone (its error goes into the report), and the report is written
after each, so one bug costs one figure, not the lease:

1. ``matmul``: the bf16 rate of an 8192^3 matrix product (median of 10 after warm-up), the ceiling of the FLOP/s
   figures below.
2. ``cuda_tests``: ``pytest -m cuda`` (tests/test_cuda.py), early, since a CUDA bug matters more than a figure.
3. ``throughput``: training images/s of the cifar10 preset (35.7M parameters, batch 128, bf16 autocast) on one
   fixed batch on the device (no data loading): bdm eager and compiled (its real step: ``train.train_step``),
   diffusers' ``UNet2DModel`` (the DDPM CIFAR-10 configuration, its training example's step: DDPMScheduler, AdamW,
   clipping, EMAModel) and denoising-diffusion-pytorch's ``Unet`` (dim 128, mults 1,2,2,2, its Trainer's step:
   GaussianDiffusion, Adam, clipping, EMA), in turns; achieved FLOP/s (counted by ``torch.utils.flop_counter``)
   against the matmul rate.
4. ``train``: the cifar10 preset (blur 20) trained for ``--minutes`` from the carried zip (``bdm train``'s own
   loop and data loader; bdm's default ``train.compile``: CUDA graphs on one GPU), then ``--n`` samples with unipc at
   20 steps (21 network calls), written as uint8 NHWC ``samples_*.npz`` parts, and ``--n-check`` samples of the same
   model with ancestral 100 (``ancestral_*.npz``: tells an early model's ODE sampling from a GPU-path fault);
   sampling images/s. ``--only PART,...`` runs some parts (a second try, within the same 15 minutes).
5. ``speeds``: the preset's own sampler (ancestral, 1000 steps) in images/s, and FID-feature images/s
   (the Inception with random weights: the real 91 MB are not carried).

Back here, ``python bench/gpu.py --score DIR`` (DIR: the files the device returned) computes the FID of the
samples against CIFAR-10 (../shared/fid/cifar10-test-stats.npz, the 10,000 test images) and writes the GPU section
of docs/benchmarks.md from DIR/report.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bdm_cli.config import load_config  # noqa: E402
from bdm_cli.io import atomic_write, to_uint8  # noqa: E402
from bdm_cli.runtime import bf16_network, compile_enabled, compiled, denoiser  # noqa: E402
from bdm_cli.train import make_optimizer, train, train_step  # noqa: E402
from bdm_cli.unet import build_model, count_parameters  # noqa: E402
import study  # noqa: E402  (bench/study.py: write_section)
from quality import ema_decay_for  # noqa: E402  (bench/quality.py: an EMA horizon of a tenth of the run)

MARKERS = ("<!-- gpu: written by bench/gpu.py -->", "<!-- /gpu -->")
SHARED = ROOT.parent / "shared"

# The peers at bdm's preset size: (diffusers UNet2DModel kwargs, denoising-diffusion-pytorch Unet kwargs).
PEERS = {
    "cifar10": (dict(sample_size=32, layers_per_block=2, block_out_channels=(128, 256, 256, 256), dropout=0.1,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
                dict(dim=128, dim_mults=(1, 2, 2, 2), dropout=0.1)),
    "tiny": (dict(sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
             dict(dim=8, dim_mults=(1, 2), attn_dim_head=8, attn_heads=2)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device, calls: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


def matmul(device: torch.device, smoke: bool) -> dict:
    n = 512 if smoke else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # random data: zeros run faster
    for _ in range(3):
        a @ b
    times = [seconds_per_call(lambda: a @ b, device, 1) for _ in range(10)]
    return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / statistics.median(times) / 1e12}


# -- training steps ---------------------------------------------------------------------------------------------

def bdm_step(cfg, device, x, compile_net: bool | str, channels_last: bool = True, native_norm: bool = False):
    """bdm's own training step (train.train_step) on one fixed batch, with stand-in data statistics;
    ``compile_net`` True (train.compile) or a torch.compile mode; ``native_norm``: PyTorch's GroupNorm also where
    bdm's compiled CUDA runs use the layout-keeping one (unet.GroupNorm), to measure what that buys."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if native_norm:
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.forward = types.MethodType(torch.nn.GroupNorm.forward, m)
    channels_last = channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema, opt = copy.deepcopy(model).requires_grad_(False), make_optimizer(model, cfg.train)
    c, r = cfg.data.channels, cfg.data.resolution
    stats = {"mean_u": torch.zeros(c, r, r, device=device), "var_u": torch.ones(c, r, r, device=device),
             "basis_u": torch.eye(c, device=device)[:, :, None, None].expand(c, c, r, r)}  # as data_stats: colour bases
    net = torch.compile(model, mode=compile_net) if isinstance(compile_net, str) else compiled(model, str(compile_net), device)
    net = bf16_network(net, device, True)
    eps_model = denoiser(net, cfg, stats)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def step():
        t = torch.rand(len(x), device=device)
        noise = torch.randn_like(x)
        train_step(eps_model, model, ema, opt, x, t, noise, cfg.diffusion, lr=1e-4, grad_clip=cfg.train.grad_clip,
                   ema_decay=cfg.train.ema_decay)

    def flops():
        t = torch.rand(len(x), device=device)
        loss = F.mse_loss(denoiser(bf16_network(model, device, True), cfg, stats)(x, t).float(), torch.randn_like(x))
        loss.backward()

    return step, flops, count_parameters(model)


def diffusers_step(kwargs, device, x):
    """diffusers' train_unconditional.py step: DDPMScheduler.add_noise, eps MSE, clipping, AdamW, EMAModel."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    net = UNet2DModel(in_channels=x.shape[1], out_channels=x.shape[1], **kwargs).to(device)
    sched, opt = DDPMScheduler(num_train_timesteps=1000), torch.optim.AdamW(net.parameters(), lr=1e-4)
    ema = EMAModel(net.parameters(), decay=0.9999)
    ema.to(device)

    def forward():
        noise = torch.randn_like(x)
        ts = torch.randint(0, 1000, (len(x),), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            pred = net(sched.add_noise(x, noise, ts), ts).sample
        return F.mse_loss(pred.float(), noise)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.step(net.parameters())

    return step, lambda: forward().backward(), sum(p.numel() for p in net.parameters())


def ddpm_step(kwargs, device, x):
    """denoising-diffusion-pytorch's Trainer step: GaussianDiffusion's loss, clipping, Adam, its EMA."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(0)
    unet = Unet(channels=x.shape[1], **kwargs)
    diffusion = GaussianDiffusion(unet, image_size=x.shape[-1], timesteps=1000).to(device)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10).to(device)
    x01 = (x + 1) / 2  # it takes images in [0, 1]

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return diffusion(x01)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        ema.update()

    return step, lambda: forward().backward(), sum(p.numel() for p in unet.parameters())


def throughput(preset: str, device: torch.device, rounds: int, calls: int, compile_too: bool) -> dict:
    """Training images/s of each variant, in turns (A B C D A B C D ...); FLOPs per step counted once, eagerly."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(preset, ["train.compile=false"])
    batch = cfg.train.batch_size
    x = torch.rand(batch, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, device=device) * 2 - 1
    builders = {"bdm": lambda: bdm_step(cfg, device, x, False)}
    if compile_too:
        builders["bdm, compiled"] = lambda: bdm_step(cfg, device, x, True)
        builders["bdm, compiled, CUDA graphs"] = lambda: bdm_step(cfg, device, x, "reduce-overhead")
    builders["diffusers UNet2DModel"] = lambda: diffusers_step(PEERS[preset][0], device, x)
    builders["denoising-diffusion-pytorch Unet"] = lambda: ddpm_step(PEERS[preset][1], device, x)
    variants, out = {}, {"preset": preset, "batch": batch, "variants": {}}
    for name, build in builders.items():
        row = out["variants"][name] = {}
        try:
            step, flops, params = build()
            counter = FlopCounterMode(display=False)
            with counter:
                flops()
            t0 = time.perf_counter()
            step()  # the first call compiles where asked
            sync(device)
            row.update(params=params, flops_per_step=counter.get_total_flops(), first_step_s=time.perf_counter() - t0)
            for _ in range(2):
                step()
            variants[name] = step
        except Exception as e:  # a peer that is not installed or breaks: reported, the others still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(seconds_per_call(step, device, calls))
            if device.type == "cuda":
                out["variants"][name]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for name, ts in times.items():
        row = out["variants"][name]
        s = statistics.median(ts)
        row.update(images_per_s=batch / s, step_ms=s * 1e3, spread=(max(ts) - min(ts)) / s,
                   tflops=row["flops_per_step"] / s / 1e12)
    return out


def tune(device: torch.device, smoke: bool, compile_too: bool) -> dict:
    """``--tune``: where bdm's training step spends its time (torch.profiler: the top kernels, and the GPU's busy time
    against the wall) and what the settings that could buy it back measure: NCHW against channels_last, a larger
    batch, compilation with and without CUDA graphs; the fastest row is profiled. Each row: median of 3 rounds, in
    turns. Tried on an H200 on 2026-11-27 and dropped: cuDNN's autotuner (13% slower), GroupNorm in bf16 instead of autocast's float32 (no
    change); docs/benchmarks.md has the profile."""
    from torch.profiler import ProfilerActivity, profile

    cfg = load_config("tiny" if smoke else "cifar10", ["train.compile=false"])
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    settings = {"baseline": {}, "NCHW": {"channels_last": False}, "batch x2": {"batch": 2}}
    if compile_too:
        settings.update({"compiled": {"compile": True}, "compiled, CUDA graphs": {"compile": "reduce-overhead"},
                         "compiled, CUDA graphs, PyTorch GroupNorm": {"compile": "reduce-overhead", "native_norm": True},
                         "compiled, CUDA graphs, batch x2": {"compile": "reduce-overhead", "batch": 2}})
    out, steps = {"rows": {}}, {}
    for name, st in settings.items():
        torch.backends.cudnn.benchmark = st.get("benchmark", False)
        x = torch.rand(cfg.train.batch_size * st.get("batch", 1), *shape, device=device) * 2 - 1
        try:
            step, _, _ = bdm_step(cfg, device, x, st.get("compile", False), st.get("channels_last", True),
                                  st.get("native_norm", False))
            for _ in range(3):
                step()
            steps[name] = (step, len(x), st.get("benchmark", False))
        except Exception as e:
            out["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(3):
        for name, (step, _, bench) in steps.items():
            torch.backends.cudnn.benchmark = bench
            times[name].append(seconds_per_call(step, device, 2 if smoke else 10))
    for name, ts in times.items():
        out["rows"][name] = {"images_per_s": steps[name][1] / statistics.median(ts), "step_ms": statistics.median(ts) * 1e3}
    name = max(steps, key=lambda k: out["rows"][k]["images_per_s"])  # where the remaining time is worth finding
    step, _, bench = steps[name]
    torch.backends.cudnn.benchmark = bench
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        sync(device)
    wall = (time.perf_counter() - t0) / 3
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key, 0) for e in events if e.device_type.name == ("CUDA" if device.type == "cuda" else "CPU")) / 3e6
    out.update(profiled=name, wall_ms=wall * 1e3, device_busy_ms=busy * 1e3,
               table=events.table(sort_by=key, row_limit=25, max_name_column_width=60))
    torch.backends.cudnn.benchmark = False
    return out


# -- the timed training and its samples -----------------------------------------------------------------------

def timed_training(args, device: torch.device, report: dict, work: Path) -> dict:
    """bdm train on the carried CIFAR-10 zip for ``--minutes`` (stopped by SIGTERM, bdm's own clean stop), then
    ``--n`` samples with unipc 20 into ``samples_*.npz``."""
    from bdm_cli.generate import load_run

    preset = "tiny" if args.smoke else "cifar10"
    batch = load_config(preset).train.batch_size
    use_compile = compile_enabled("auto", device)  # bdm's default: compiled with CUDA graphs on one GPU
    # The steps the clock will allow, from the throughput row of the same step (or the last H200 figures where the
    # row is absent): they set the EMA's horizon and the warm-up. The first run (2026-11-27) kept the preset's: after
    # 2,132 steps its 0.9999 EMA still held 81% of the initial weights and its 5,000-step warm-up had not ended (FID 316).
    row = report.get("throughput", {}).get("variants", {}).get("bdm, compiled, CUDA graphs" if use_compile else "bdm", {})
    rate, first = row.get("images_per_s", 5500.0 if use_compile else 1600.0), row.get("first_step_s", 90.0 if use_compile else 0.0)
    expected = max(10, int(max(args.minutes * 60 - first, 6.0) * rate / batch))
    steps = int(expected * 1.5)  # the clock stops it; steps only bound it
    ema_decay, warmup = ema_decay_for(expected), min(load_config(preset).train.warmup, expected // 20)
    cfg = load_config(preset, [f"data.dataset={args.data}", f"data.num_workers={args.workers}", f"train.steps={steps}",
                               f"train.ema_decay={ema_decay}", f"train.warmup={warmup}",
                               "train.log_every=100", "train.sample_every=0", "train.checkpoint_every=0",
                               f"train.device={device.type}"]
                      + (["data.channels=3", "data.resolution=8"] if args.smoke else []))
    deadline = time.perf_counter() + args.minutes * 60
    log: list[dict] = []
    stopped: list[bool] = []

    def progress(d: dict) -> None:
        if "loss" in d:
            log.append({k: d[k] for k in ("step", "loss", "images_per_s")})
        if time.perf_counter() > deadline and d["step"] >= 2 and not stopped:  # two steps even on a busy machine
            stopped.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # train() ends at this step with a checkpoint, as for a scheduler's kill

    t0 = time.perf_counter()
    r = train(cfg, work / "run", progress=progress)
    train_s = time.perf_counter() - t0
    run = load_run(work / "run" / "checkpoint.pt", device=device.type)
    t0 = time.perf_counter()
    parts = write_samples(run, args, args.n, "unipc", 20, "samples")
    sample_s = time.perf_counter() - t0
    # A second sampler on the same model tells an early model's ODE sampling from a fault of the GPU path: the first
    # runs' unipc samples scored FID 305 and 289 (colour blobs); the third's ancestral 100 scored 71 where its unipc
    # 20 scored 246 (unipc's second-order terms overshoot on a young model; docs/benchmarks.md, GPU notes).
    check = write_samples(run, args, args.n_check, "ancestral", 100, "ancestral") if args.n_check else []
    return {"check_sampler": "ancestral 100", "check_parts": check, "check_n": args.n_check, "preset": preset, "minutes": args.minutes, "steps": r["step"], "images_seen": r["step"] * batch,
            "ema_decay": ema_decay, "warmup": warmup,
            "train_s": train_s, "compile": use_compile, "loss": r["loss"], "log": log[-20:], "n": args.n,
            "sampler": "unipc 20 (21 network calls)", "sample_s": sample_s, "sample_images_per_s": args.n / sample_s,
            "parts": parts}


def write_samples(run, args, n: int, sampler: str, steps: int, prefix: str) -> list[str]:
    """``n`` samples as uint8 NHWC ``{prefix}_*.npz`` parts in --out (the device returns files up to 16 MiB)."""
    from bdm_cli.generate import sample_batches

    parts, chunk, written = [], [], 0
    for x in sample_batches(run, n, batch_size=args.sample_batch, steps=steps, sampler=sampler, bf16=True):
        chunk.append(to_uint8(x).permute(0, 2, 3, 1).numpy())
        if sum(map(len, chunk)) >= args.part or written + sum(map(len, chunk)) >= n:
            path = Path(args.out) / f"{prefix}_{len(parts)}.npz"
            np.savez_compressed(path, images=np.concatenate(chunk))
            parts.append(path.name)
            written, chunk = written + sum(map(len, chunk)), []
    return parts


def speeds(args, device: torch.device, work: Path) -> dict:
    """The preset's own sampler (ancestral, 1000 steps) and the FID features, in images/s."""
    from bdm_cli.engine import sample
    from bdm_cli.fid import features, inception
    from bdm_cli.generate import load_run

    out = {}
    run = load_run(work / "run" / "checkpoint.pt", device=device.type)
    batch, steps = (8, 4) if args.smoke else (args.sample_batch, 50)
    noise = torch.randn(batch, run.cfg.data.channels, run.cfg.data.resolution, run.cfg.data.resolution, device=device)
    eps = run.denoiser(bf16=True)
    sample(eps, noise[:2], run.cfg.diffusion, 2, sampler="ancestral")  # warm-up
    s = seconds_per_call(lambda: sample(eps, noise, run.cfg.diffusion, steps, sampler="ancestral"), device, 1)
    out["ancestral_network_calls_per_s"] = batch * steps / s
    out["ancestral_1000_images_per_s"] = batch * steps / s / 1000
    net = inception(2048, "random", device)
    images = [torch.rand(args.fid_batch, 3, 32, 32) for _ in range(1 if args.smoke else 4)]
    features(net, images[:1], 2048, device)  # warm-up (cuDNN picks its algorithms)
    s = seconds_per_call(lambda: features(net, images, 2048, device), device, 1)
    out["fid_features_images_per_s"] = sum(map(len, images)) / s
    return out


def cuda_tests(timeout: float, select: str = "") -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-p", "no:logging", "--tb=short",
           str(ROOT / "tests" / "test_cuda.py")]
    cmd += ["-k", select] if select else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout:.0f} s", "tail": (e.stdout or b"")[-3000:].decode(errors="replace")}
    lines = p.stdout.strip().splitlines()
    return {"returncode": p.returncode, "summary": lines[-1] if lines else "", "tail": p.stdout[-4000:]}


# -- the run ---------------------------------------------------------------------------------------------------

PARTS = ("matmul", "cuda_tests", "throughput", "train", "speeds")


def run(args) -> dict:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "command": " ".join(["python3", "bench/gpu.py"] + sys.argv[1:]), "smoke": args.smoke}
    work = Path(tempfile.mkdtemp(prefix="bdm-gpu-"))

    def part(name: str, fn) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as e:
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        report[name]["seconds"] = time.perf_counter() - t0
        with atomic_write(out / "report.json", "w") as f:
            json.dump(report, f, indent=1, default=str)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # what training uses
    if args.tune:
        part("tune", lambda: tune(device, args.smoke, not args.no_compile))
        if not args.skip_tests:
            part("cuda_tests", lambda: cuda_tests(args.test_timeout, args.tests))
        print(json.dumps({k: report[k] for k in ("tune", "cuda_tests") if k in report}, indent=1, default=str)[-9000:])
        print(report["tune"].get("table", "")[-5000:])
        return report
    wanted = set(args.only.split(",")) if args.only else set(PARTS)
    if "matmul" in wanted:
        part("matmul", lambda: matmul(device, args.smoke))
    if not args.skip_tests and "cuda_tests" in wanted:  # early: a CUDA bug they find matters more than any figure
        part("cuda_tests", lambda: cuda_tests(args.test_timeout, args.tests))
    if "throughput" in wanted:
        part("throughput", lambda: throughput("tiny" if args.smoke else "cifar10", device, rounds=2 if args.smoke else 3,
                                              calls=2 if args.smoke else 15, compile_too=not args.no_compile))
    if "train" in wanted:
        part("train", lambda: timed_training(args, device, report, work))
    if "speeds" in wanted and "train" in wanted:  # it samples the timed training's model
        part("speeds", lambda: speeds(args, device, work))
    report["wall_s"] = time.perf_counter() - start
    with atomic_write(out / "report.json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(summary(report), flush=True)
    return report


def summary(report: dict) -> str:
    """The figures in a few lines (the device tool returns the end of the output)."""
    lines = [f"device {report['device_name']}, torch {report['torch']}, wall {report.get('wall_s', 0):.0f} s"]
    m = report.get("matmul", {})
    lines.append(f"matmul: {m.get('tflops', float('nan')):.0f} TFLOP/s" if "tflops" in m else f"matmul: {m.get('error')}")
    for name, row in report.get("throughput", {}).get("variants", {}).items():
        lines.append(f"{name}: " + (f"{row['images_per_s']:.0f} img/s, {row['tflops']:.0f} TFLOP/s, {row['params'] / 1e6:.1f}M"
                                    if "images_per_s" in row else str(row.get("error"))))
    for key in ("throughput", "train", "speeds", "cuda_tests"):
        r = report.get(key, {})
        if "error" in r:
            lines.append(f"{key}: {r['error']}")
    t = report.get("train", {})
    if "steps" in t:
        lines.append(f"train: {t['steps']} steps in {t['train_s']:.0f} s, loss {t['loss']:.4f}; "
                     f"{t['n']} samples at {t['sample_images_per_s']:.0f} img/s")
    s = report.get("speeds", {})
    if "fid_features_images_per_s" in s:
        lines.append(f"ancestral 1000: {s['ancestral_1000_images_per_s']:.1f} img/s; FID features "
                     f"{s['fid_features_images_per_s']:.0f} img/s")
    if "cuda_tests" in report:
        lines.append(f"cuda tests: {report['cuda_tests'].get('summary', report['cuda_tests'].get('error'))}")
    return "\n".join(lines)


# -- back on the CPU machine -------------------------------------------------------------------------------------

def score(args) -> None:
    """FID of the returned samples against CIFAR-10 test (the main run's and every ``--tuned`` run's that trained),
    then the docs section."""
    reports = {Path(d): json.loads((Path(d) / "report.json").read_text()) for d in [args.score, *args.tuned]}
    for src, report in reports.items():
        t = report.get("train", {})
        if t.get("parts") and "fid" not in t:
            t.update(score_samples(src, t["parts"], Path(args.reference), args.inception_weights))
        if t.get("check_parts") and "check_fid" not in t:
            t["check_fid"] = score_samples(src, t["check_parts"], Path(args.reference), args.inception_weights)["fid"]
            with atomic_write(src / "report.json", "w") as f:
                json.dump(report, f, indent=1, default=str)
    main, *extra = reports.values()
    study.write_section(section(main, extra), Path(args.docs), MARKERS)
    print(summary(main))


def score_samples(src: Path, parts: list[str], ref: Path, weights: str) -> dict:
    """FID of the npz parts' images against the reference statistics (Inception on the CPU)."""
    from bdm_cli import fid

    images = np.concatenate([np.load(src / p)["images"] for p in parts])
    model = fid.inception(2048, weights, "cpu")
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    mu, sigma = fid.features(model, (x[i : i + 200].float() / 255 for i in range(0, len(x), 200)), 2048, "cpu").result()
    ref_stats = np.load(ref)
    return {"fid": fid.frechet_distance(mu, sigma, ref_stats["mu"], ref_stats["sigma"]),
            "fid_reference": f"{ref.name} ({len(images)} samples against the 10,000 CIFAR-10 test images)"}


def training_line(t: dict) -> str:
    """One timed training (a report's "train") in words."""
    tc = load_config(t["preset"]).train
    ema, warmup = t.get("ema_decay", tc.ema_decay), t.get("warmup", tc.warmup)
    schedule_note = (f"EMA decay {ema:g} (the initial weights still weigh {ema ** t['steps']:.0%} of the EMA at the end), "
                     f"warm-up {warmup:,} steps" + (" (not ended: the learning rate never reached its value)"
                                                     if warmup > t["steps"] else ""))
    fid_line = (f"FID **{t['fid']:.2f}** against {t['fid_reference']}" if "fid" in t else "FID not yet scored "
                "(`python bench/gpu.py --score DIR`)")
    rates = [r["images_per_s"] for r in t.get("log", [])[1:] if "images_per_s" in r]  # the first window holds the compile
    rate = f"; {statistics.median(rates):,.0f} images/s after the first log window" if rates else ""
    return (f"Timed training: the {t['preset']} preset (blur 20, sin2) from the carried CIFAR-10 zip with `bdm train`'s "
            f"own loop and loader, stopped after {t['minutes']} minutes, compilation included: {t['steps']} steps, "
            f"{t['images_seen']:,} images seen (compile {'on' if t['compile'] else 'off'}{rate}), last logged loss "
            f"{t['loss']:.4f}; {schedule_note}. Then {t['n']:,} samples with {t['sampler']} at "
            f"{t['sample_images_per_s']:.0f} images/s: {fid_line}."
            + (f" The same model with {t['check_sampler']} ({t['check_n']:,} samples): FID **{t['check_fid']:.2f}**."
               if "check_fid" in t else ""))


def section(report: dict, extra_reports: list[dict] = ()) -> str:
    """The GPU section of docs/benchmarks.md (``extra_reports``: later runs, --tune or --only, shown after the figures)."""
    m, tp, t, s = (report.get(k, {}) for k in ("matmul", "throughput", "train", "speeds"))
    peak = m.get("tflops", float("nan"))
    lines = [MARKERS[0], "## GPU: training and sampling speed, and a timed CIFAR-10 training", "",
             f"Measured by `{report['command']}` on one {report['device_name']} (torch {report['torch']}, "
             f"{report['date']}), {report.get('wall_s', 0):.0f} s wall in all. The ceiling: a bf16 8192^3 matrix product "
             f"at **{peak:.0f} TFLOP/s** (median of 10, same run).", ""]
    rows = tp.get("variants", {})
    ours = {k: r["images_per_s"] for k, r in rows.items() if k.startswith("bdm") and "images_per_s" in r}
    peers = {k: r["images_per_s"] for k, r in rows.items() if not k.startswith("bdm") and "images_per_s" in r}
    if ours and peers:
        best, fastest = max(ours, key=ours.get), max(peers, key=peers.get)
        share = rows[best]["tflops"] / peak
        lines += [f"Issue #12's goals: bdm's training images/s at least 1.2x the fastest peer: **{ours[best] / peers[fastest]:.2f}x** "
                  f"({best} against {fastest}; eager {ours.get('bdm', float('nan')) / peers[fastest]:.2f}x), "
                  f"{'met' if ours[best] >= 1.2 * peers[fastest] else 'not met'}; at least 35% of the matmul rate: "
                  f"**{share:.0%}**, {'met' if share >= 0.35 else 'not met'}.", ""]
    if tp.get("variants"):
        lines += [f"Training step of the {tp['preset']} preset size, batch {tp['batch']}, bf16 autocast, one fixed batch on "
                  "the device (no data loading), median of 3 rounds of 15 steps taken in turns. FLOPs of forward and "
                  "backward counted by torch.utils.flop_counter (matrix products and convolutions).", "",
                  "| | parameters | images/s | step (ms) | TFLOP/s | of the matmul rate | first step (s) | peak memory (GiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in tp["variants"].items():
            if "images_per_s" in row:
                lines.append(f"| {name} | {row['params'] / 1e6:.1f}M | {row['images_per_s']:.0f} | {row['step_ms']:.1f} | "
                             f"{row['tflops']:.0f} | {row['tflops'] / peak:.0%} | {row['first_step_s']:.1f} | "
                             f"{row.get('peak_gib', float('nan')):.1f} |")
            else:
                lines.append(f"| {name} | | failed: {row.get('error')} | | | | | |")
        lines.append("")
    if "steps" in t:
        lines += [training_line(t), ""]
    if "fid_features_images_per_s" in s:
        lines += [f"Sampling with the preset's own sampler (ancestral, 1000 steps, bf16): "
                  f"{s['ancestral_1000_images_per_s']:.1f} images/s ({s['ancestral_network_calls_per_s']:.0f} network calls "
                  f"x images per s). FID features (Inception, float32 without TF32): {s['fid_features_images_per_s']:.0f} "
                  "images/s.", ""]
    for tuned in extra_reports:
        if "steps" in tuned.get("train", {}):
            lines += [f"A later run (`{tuned['command']}`, {tuned['device_name']}, {tuned['date']}): "
                      + training_line(tuned["train"]), ""]
        if "tune" not in tuned:
            c = tuned.get("cuda_tests", {})
            if c:
                lines += [f"CUDA tests in that run: {c.get('summary') or c.get('error')}.", ""]
            continue
        u = tuned["tune"]
        lines += [f"Where the step's time goes (`{tuned['command']}`, {tuned['device_name']}, {tuned['date']}): "
                  f"profiling 3 steps of the {u['profiled']} row, the GPU was busy {u['device_busy_ms']:.1f} ms of each "
                  f"step's {u['wall_ms']:.0f} ms under the profiler. The settings that could buy time back, images/s "
                  "(median of 3 rounds, in turns):", "", "| setting | images/s | step (ms) |", "|---|---|---|"]
        lines += [f"| {name} | {row['images_per_s']:.0f} | {row['step_ms']:.1f} |" if "images_per_s" in row
                  else f"| {name} | failed: {row.get('error')} | |" for name, row in u["rows"].items()]
        table = [line for line in u.get("table", "").splitlines() if line.strip() and not line.startswith("-")]
        lines += ["", "The top kernels of that profile (self device time of 3 steps):", "", "```",
                  *table[:10], "```", ""]
        c = tuned.get("cuda_tests", {})
        if c:
            lines += [f"CUDA tests in that run (`{tuned['command'].split('--tests ')[-1] if '--tests' in tuned['command'] else 'all'}`): "
                      f"{c.get('summary') or c.get('error')}.", ""]
    c = report.get("cuda_tests", {})
    if c:
        lines += [f"CUDA tests (`pytest -m cuda`, tests/test_cuda.py): {c.get('summary') or c.get('error')}.", ""]
    for key in ("matmul", "throughput", "train", "speeds", "cuda_tests"):
        if "error" in report.get(key, {}):
            lines += [f"Part `{key}` failed: `{report[key]['error']}`", ""]
    lines.append(MARKERS[1])
    return "\n".join(lines)


def smoke_data(folder: Path) -> Path:
    """A small zip of random images in the layout of the carried CIFAR-10 one (train/<class>/N.png)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    path = folder / "smoke-train.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i in range(64):
            img = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
            tmp = folder / "img.png"
            img.save(tmp)
            z.write(tmp, f"train/c{i % 4}/{i}.png")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-check"), help="report and samples go here ($OUT)")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU at the tiny preset (a minute or two)")
    p.add_argument("--data", default=str(ROOT / ".gpu-data" / "cifar10-train.zip"))
    p.add_argument("--minutes", type=float, default=2.0, help="the timed training's length, compilation included")
    p.add_argument("--n", type=int, default=10_000, help="samples of the timed training's model")
    p.add_argument("--n-check", type=int, default=2_000, help="samples of the same model with ancestral 100 (0: none)")
    p.add_argument("--part", type=int, default=5_000, help="samples per npz part (the device returns files <= 16 MiB)")
    p.add_argument("--sample-batch", type=int, default=1000)
    p.add_argument("--fid-batch", type=int, default=500)
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--test-timeout", type=float, default=180, help="seconds the cuda tests may take")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--only", default="", help=f"comma-separated parts to run (of {', '.join(PARTS)}; speeds needs train)")
    p.add_argument("--tests", default="", help="only the cuda tests matching this -k expression")
    p.add_argument("--tune", action="store_true", help="only: where the training step's time goes, and settings that "
                   "could buy it back (then the cuda tests)")
    p.add_argument("--score", metavar="DIR", help="here, after the device run: FID of DIR's samples, then the docs section")
    p.add_argument("--tuned", nargs="*", default=[], metavar="DIR", help="with --score: later runs (--tune, --only) to show too")
    p.add_argument("--reference", default=str(SHARED / "fid" / "cifar10-test-stats.npz"))
    p.add_argument("--inception-weights", default=str(SHARED / "fid" / "pt_inception-2015-12-05.pth"))
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    if args.only and set(args.only.split(",")) - set(PARTS):
        p.error(f"--only takes parts of {', '.join(PARTS)}")
    if args.score:
        return score(args)
    if args.smoke:
        folder = Path(tempfile.mkdtemp(prefix="bdm-gpu-smoke-"))
        args.data = str(smoke_data(folder)) if args.data == p.get_default("data") else args.data
        args.minutes, args.n, args.part, args.sample_batch, args.fid_batch, args.n_check = 0.1, 24, 16, 8, 4, 8
        args.workers, args.no_compile = 0, True
    run(args)


if __name__ == "__main__":
    main()

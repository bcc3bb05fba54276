"""Sample-quality benchmarks of issue #5: FID against network evaluations (item 5) and blur against no blur at
equal images seen, beside denoising-diffusion-pytorch's own Trainer (item 6).

    python bench/quality.py                                 # the issue's protocol (many CPU hours)
    python bench/quality.py --train-steps 400 --n 100       # a smaller run of the same protocol

Every training and every FID is kept under --work (default runs/bench): a re-run continues an unfinished
training (`bdm train --resume`) and skips the FIDs it has, so the hours can be spread over several sittings.
Results go to <work>/quality.json and two plots to docs/; bench/run.py turns them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bdm_cli import fid  # noqa: E402
from bdm_cli.engine import nfe  # noqa: E402
from bdm_cli.generate import load_run, sample_batches  # noqa: E402
from bdm_cli.io import atomic_write  # noqa: E402
from bdm_cli.runtime import bf16_native  # noqa: E402

SHARED = ROOT.parent / "shared"
ZIP, WEIGHTS = SHARED / "data/cifar10-jpeg.zip", SHARED / "fid/pt_inception-2015-12-05.pth"
# Item 6: the three bdm trainings (cifar10_cpu, identical but for the blur) and the peer.
TRAININGS = {"blur 20 (sin2)": [], "no blur": ["--set", "diffusion.sigma_blur_max=0"],
             "blur 20 (linear)": ["--set", "diffusion.blur=linear"]}
PEER = "denoising-diffusion-pytorch"
ISSUE_TRAIN_STEPS = 2500  # "as many images as about an hour each allows" on a 2-core CPU with native bf16
ISSUE_N = 2000  # samples per FID
# bf16 autocast for every model (bdm and the peer) only where this CPU computes bf16 natively, as bdm decides.
BF16 = bf16_native(torch.device("cpu"))
SAMPLERS = [("ancestral", "uniform"), ("ddim", "logsnr"), ("ddim", "spectral"), ("heun", "logsnr"), ("heun", "spectral")]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def extract(split: str, dest: Path) -> Path:
    """The CIFAR-10 ``split`` of the shared zip as a folder of JPEGs (denoising-diffusion-pytorch reads folders)."""
    done = dest / ".complete"
    if not done.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(ZIP) as z:
            for name in z.namelist():
                if name.startswith(f"{split}/") and name.lower().endswith(".jpg"):
                    (dest / name.replace("/", "_")).write_bytes(z.read(name))
        done.touch()
    return dest


def train_bdm(name: str, extra: list[str], args, work: Path) -> Path:
    """``bdm train`` of cifar10_cpu on the shared CIFAR-10 train split, resumed if a checkpoint is there."""
    run = work / slug(name)
    ckpt = run / "checkpoint.pt"
    if ckpt.exists() and torch.load(ckpt, map_location="cpu", weights_only=True)["step"] >= args.train_steps:
        return run
    common = ["--steps", str(args.train_steps), "--batch-size", str(args.batch_size),
              "--set", f"train.warmup={args.warmup}", "--set", f"train.ema_decay={args.ema_decay}",
              "--set", "train.log_every=10", "--set", "train.sample_every=0",
              "--set", f"train.checkpoint_every={max(args.train_steps // 10, 1)}", "--set", "sample.n=16"]
    where = ["--resume", str(run)] if ckpt.exists() else ["--out", str(run)]
    cmd = [sys.executable, "-m", "bdm_cli", "train", "--preset", "cifar10_cpu", "--data", str(ZIP), *where, *common, *extra]
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return run


def bdm_log(run: Path) -> tuple[list[tuple[int, float]], float]:
    """The loss curve of a bdm run and its training minutes, from metrics.jsonl (one row every log_every steps)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    # the first row comes log_every steps in: scale the span between rows up to all the steps
    first, last = rows[0], rows[-1]
    seconds = (last["time"] - first["time"]) * last["step"] / max(last["step"] - first["step"], 1)
    return [(r["step"], r["loss"]) for r in rows], seconds / 60


def recorded_diffusion(net, **kwargs):
    """denoising-diffusion-pytorch's GaussianDiffusion around ``net``, its own loss recorded per step in ``.losses``
    for the loss curve (its Trainer only shows it in tqdm)."""
    from denoising_diffusion_pytorch import GaussianDiffusion

    class Recorded(GaussianDiffusion):
        losses: list[float] = []

        def forward(self, img, *a, **k):
            loss = super().forward(img, *a, **k)
            if self.training:
                self.losses.append(loss.item())
            return loss

    return Recorded(net, **kwargs)


def peer_model(image_size: int = 32):
    """denoising-diffusion-pytorch at cifar10_cpu's size: Unet(dim 60, mults 1,2,2) has 4.64M parameters (bdm: 4.44M)."""
    from denoising_diffusion_pytorch import Unet

    return recorded_diffusion(Unet(dim=60, dim_mults=(1, 2, 2), flash_attn=False), image_size=image_size, timesteps=1000,
                              sampling_timesteps=25)


def train_peer(args, work: Path) -> Path:
    """The same images seen through denoising-diffusion-pytorch's ``Trainer`` (its defaults: v-prediction, sigmoid
    schedule, EMA every 10 steps), the lr, batch and precision of the bdm runs."""
    from denoising_diffusion_pytorch import Trainer

    out = work / slug(PEER)
    final = out / "model-1.pt"
    if final.exists():
        return out
    diffusion = peer_model()
    trainer = Trainer(diffusion, str(extract("train", work / "cifar10_train")), train_batch_size=args.batch_size,
                      train_lr=args.lr, train_num_steps=args.train_steps, save_and_sample_every=args.train_steps,
                      num_samples=16, results_folder=str(out), amp=BF16, mixed_precision_type="bf16",
                      calculate_fid=False, ema_decay=0.995)
    t0 = time.perf_counter()
    trainer.train()
    with atomic_write(out / "losses.json", "w") as f:
        json.dump({"losses": diffusion.losses, "seconds": time.perf_counter() - t0}, f)
    return out


def peer_log(run: Path) -> tuple[list[tuple[int, float]], float | None]:
    """The peer's loss curve (means over 10 steps, like bdm's log) and training minutes (None from an older run)."""
    saved = json.loads((run / "losses.json").read_text())
    losses, seconds = (saved, None) if isinstance(saved, list) else (saved["losses"], saved["seconds"])
    return smooth(losses, 10), None if seconds is None else seconds / 60


def peer_batches(run: Path, n: int, batch_size: int):
    """Samples of the peer's EMA model with its own sampler (DDIM, 25 steps), as [0, 1] images."""
    from ema_pytorch import EMA

    diffusion = peer_model()
    ema = EMA(diffusion, beta=0.995, update_every=10)
    ema.load_state_dict(torch.load(run / "model-1.pt", map_location="cpu", weights_only=True)["ema"])
    model = ema.ema_model.eval()
    torch.manual_seed(0)
    for start in range(0, n, batch_size):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            x = model.sample(batch_size=min(batch_size, n - start))
        yield fid.as_inception_input(x.float() * 2 - 1)


class Fids:
    """FIDs kept in <work>/fids.json, keyed by what determines them."""

    def __init__(self, work: Path, n: int):
        self.path, self.n = work / "fids.json", n
        self.values = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.inception = fid.inception(2048, WEIGHTS, "cpu")
        test = extract("test", work / "cifar10_test")
        self.ref = fid.stats_of(str(test), self.inception, dims=2048, device="cpu", weights_id=str(WEIGHTS))

    def get(self, key: str, batches) -> float:
        key = f"{key} n={self.n}"
        if key not in self.values:
            t0 = time.perf_counter()
            mu, sigma = fid.features(self.inception, batches(), 2048, "cpu").result()
            self.values[key] = fid.frechet_distance(mu, sigma, self.ref[0], self.ref[1])
            print(f"{key}: FID {self.values[key]:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            with atomic_write(self.path, "w") as f:
                json.dump(self.values, f, indent=1)
        return self.values[key]

    def of_run(self, run: Path, sampler: str, grid: str, steps: int) -> float:
        def batches():
            r = load_run(run / "checkpoint.pt", device="cpu")
            for x in sample_batches(r, self.n, steps=steps, sampler=sampler, grid=grid, batch_size=250, bf16=True):
                yield fid.as_inception_input(x)
        return self.get(f"{run.name} {sampler} {grid} {steps}", batches)


def plots(results: dict, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in results["fid_vs_nfe"].items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label, markersize=3)
    ax.set(xscale="log", xlabel="network evaluations", ylabel=f"FID (n={results['settings']['n']}, CIFAR-10 test)",
           title="cifar10_cpu, blur 20: FID against network evaluations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(docs / "bench_fid_vs_nfe.png", "wb") as f:
        fig.savefig(f, format="png")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, curve in results["losses"].items():
        ax.plot([c[0] * results["settings"]["batch_size"] for c in curve], [c[1] for c in curve], label=label, lw=1)
    ax.set(yscale="log", xlabel="training images seen", ylabel="training loss (each library's own)",
           title="cifar10_cpu on CIFAR-10: loss curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(docs / "bench_loss.png", "wb") as f:
        fig.savefig(f, format="png")
    plt.close("all")


def smooth(losses: list[float], every: int) -> list[tuple[int, float]]:
    """Per-step losses as means over ``every`` steps, like bdm's metrics.jsonl."""
    return [(i + every, sum(losses[i:i + every]) / len(losses[i:i + every])) for i in range(0, len(losses), every)]


def ema_decay_for(steps: int) -> float:
    """An EMA horizon 1 / (1 - decay) of a tenth of the steps: 0.996 at 2,500 steps. A fixed 0.995 would leave a
    120-step training's EMA more than half its random initialisation (0.995^120 = 0.55)."""
    return min(max(1 - 10 / steps, 0.9), 0.9999)


def run(args) -> dict:
    if args.ema_decay is None:
        args.ema_decay = ema_decay_for(args.train_steps)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {name: train_bdm(name, extra, args, work) for name, extra in TRAININGS.items()}
    peer = train_peer(args, work) if args.peer else None
    fids = Fids(work, args.n)
    main = runs["blur 20 (sin2)"]
    curves = {}
    for sampler, grid in SAMPLERS:
        steps = args.ancestral_steps if sampler == "ancestral" else args.steps
        curves[f"{sampler}, {grid} grid"] = [(nfe(sampler, s), fids.of_run(main, sampler, grid, s)) for s in steps]
    best_nfe = args.best_nfe
    deterministic = [(fid_, label, s) for label, pts in curves.items() if not label.startswith("ancestral")
                     for (e, fid_), s in zip(pts, args.steps) if e <= best_nfe]
    best = min(deterministic)
    best_sampler, best_grid = best[1].split(", ")[0], best[1].split(", ")[1].split()[0]
    # Item 6 at the best deterministic setting within best_nfe evaluations, the same for every bdm run.
    table = {name: fids.of_run(r, best_sampler, best_grid, best[2]) for name, r in runs.items()}
    logs = {name: bdm_log(r) for name, r in runs.items()}
    if peer is not None:
        table[PEER] = fids.get(f"{PEER} ddim 25", lambda: peer_batches(peer, args.n, 250))
        logs[PEER] = peer_log(peer)
    settings = {k: getattr(args, k) for k in ("train_steps", "batch_size", "lr", "warmup", "ema_decay", "n", "steps",
                                              "ancestral_steps", "best_nfe", "peer")}
    settings["bf16"] = BF16
    results = {"settings": settings, "fid_vs_nfe": curves,
               "best": {"sampler": best_sampler, "grid": best_grid, "steps": best[2], "nfe": nfe(best_sampler, best[2]), "fid": best[0]},
               "ancestral_1000": dict(curves[f"ancestral, uniform grid"]).get(1000),
               "blur_table": table, "losses": {k: v[0] for k, v in logs.items()},
               "train_minutes": {k: v[1] for k, v in logs.items()}}
    plots(results, ROOT / "docs")
    with atomic_write(work / "quality.json", "w") as f:
        json.dump(results, f, indent=1)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default=str(ROOT / "runs" / "bench"), help="trainings and FIDs are kept here")
    p.add_argument("--train-steps", type=int, default=ISSUE_TRAIN_STEPS,
                   help="steps of every training (2,500 x 64 = 160k images: about an hour each in bf16 on a 2-core "
                        "AVX-512 BF16 CPU, three in float32 on AVX2)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay of the bdm runs (default: an EMA horizon of a tenth of the training)")
    p.add_argument("--n", type=int, default=ISSUE_N, help="samples per FID (against the 10,000 CIFAR-10 test images)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 250], help="ddim and heun steps")
    p.add_argument("--ancestral-steps", type=int, nargs="+", default=[10, 25, 50, 100, 250, 1000])
    p.add_argument("--best-nfe", type=int, default=50, help="the deterministic budget compared with ancestral 1000")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip denoising-diffusion-pytorch's Trainer")


if __name__ == "__main__":
    arguments = parser().parse_args()  # --help needs no data
    if not ZIP.exists() or not WEIGHTS.exists():
        sys.exit(f"needs {ZIP} and {WEIGHTS} (../shared beside the checkout)")
    run(arguments)

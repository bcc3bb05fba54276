"""The converged study (issue #10, bench item 8): do bdm's models sample like their data?

Digits at 16x16 (the 1,797 images bundled with scikit-learn), trained to convergence on this CPU:

* bdm with sigma_blur_max 0, 1, 2 and 4 (sin2), then the linear blur at the best nonzero value;
* denoising-diffusion-pytorch's own ``Trainer`` on the same images (its defaults; the same batch, lr, precision
  and images seen), sampled its own way (its DDIM);
* each scored at every checkpoint (loss, FID and KID against images seen), and at the end with ``--n`` samples:
  FID and KID against the 1,797 digits, and the pixel and spectrum statistics of ``bdm_cli.spectrum``;
* the floor: the same metrics between two halves of the digits, which no model can beat by much.

    python bench/study.py                  # the whole study; resumes from its caches under --work
    python bench/study.py --demo runs/demo # also scores the run `make demo` wrote (issue #10, point 3)
    python bench/study.py --smoke          # the same code at a toy scale, in a few minutes

Item 9 (issue #11) samples the best blurred model of item 8 with every sampler at 5 to 50 network evaluations.
bdm's trainings resume (``bdm train --resume``; the peer's starts over) and every score is cached in
<work>/scores.json, so the study can be stopped and continued. It writes <work>/study.json, the plots
docs/study_*.png and its section of docs/benchmarks.md (between the ``study`` markers; bench/run.py keeps it).
tests/test_bench_study.py checks the report on synthetic results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # the peer's progress bars would swamp the log

import quality  # noqa: E402  bench/quality.py beside this file
from bdm_cli import fid  # noqa: E402
from bdm_cli.data import load_digits  # noqa: E402
from bdm_cli.generate import load_run, sample_batches  # noqa: E402
from bdm_cli.io import atomic_write, make_grid, save_image  # noqa: E402
from bdm_cli.spectrum import compare, image_statistics  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "fid" / "pt_inception-2015-12-05.pth"
PEER = "denoising-diffusion-pytorch"
BLURS = (0.0, 1.0, 2.0, 4.0)  # sin2; the linear row follows at the best nonzero one
MARKERS = ("<!-- study: written by bench/study.py -->", "<!-- /study -->")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def milestones(args) -> list[int]:
    """The checkpoints scored for the curves: ``--checkpoints`` evenly spaced steps, the last the end."""
    return [round(args.steps * (k + 1) / args.checkpoints) for k in range(args.checkpoints)]


# -- training ----------------------------------------------------------------------------------------------------

def bdm_overrides(args, sigma: float, blur: str) -> list[str]:
    sets = {"diffusion.sigma_blur_max": sigma, "diffusion.blur": blur, "train.batch_size": args.batch_size,
            "train.lr": args.lr, "train.warmup": args.warmup, "train.log_every": 25, "train.sample_every": 0,
            "train.checkpoint_every": 0, "sample.sampler": args.sampler, "sample.steps": args.sample_steps,
            "sample.n": 64, "train.bf16": "false"}
    if args.smoke:
        sets.update({"model.channels": 8, "model.attn_resolutions": "[]"})
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def train_bdm(name: str, sigma: float, blur: str, args, work: Path) -> Path:
    """``bdm train --preset digits`` to every milestone in turn (resume is exact), a copy of the checkpoint at each."""
    run = work / slug(name)
    for step in milestones(args):
        keep = run / f"step_{step:06d}.pt"
        if keep.exists():
            continue
        ckpt = run / "checkpoint.pt"
        # a resumed run keeps its own config (bdm refuses --preset with --resume)
        where = ["--resume", str(run)] if ckpt.exists() else ["--preset", "digits", "--out", str(run)]
        cmd = [sys.executable, "-m", "bdm_cli", "train", "--device", "cpu", *where,
               "--steps", str(step), *bdm_overrides(args, sigma, blur)]
        print(f"[{name}] train to step {step}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
        shutil.copyfile(ckpt, keep)
    return run


def bdm_log(run: Path, batch: int) -> tuple[list[tuple[int, float]], float]:
    """The loss curve of a bdm run and its training minutes (summed over the resumed segments), from metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    # each row's images/s is measured since the previous row (or the segment's start), so this sums training time
    # alone, not the start-up of each resumed segment's process
    seconds = sum((r["step"] - prev) * batch / r["images_per_s"] for prev, r in zip([0] + [r["step"] for r in rows], rows))
    return [(r["step"], r["loss"]) for r in rows], seconds / 60


def peer_objects(args):
    """denoising-diffusion-pytorch at the digits preset's size, 1 channel, 16 px; its loss recorded per step."""
    from denoising_diffusion_pytorch import Unet

    dim = 8 if args.smoke else args.peer_dim
    net = Unet(dim=dim, dim_mults=(1, 2), channels=1, flash_attn=False)
    # its default sampler is ancestral over all 1000 steps; its own DDIM at the rows' network evaluations instead
    return quality.recorded_diffusion(net, image_size=16, timesteps=1000, sampling_timesteps=args.peer_sample_steps)


def digits_folder(work: Path) -> Path:
    """The digits as 16x16 PNGs, exactly as bdm's digits preset sees them (the peer's Trainer reads folders)."""
    folder = work / "digits16"
    done = folder / ".complete"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        from bdm_cli.io import to_uint8
        from PIL import Image

        for i, img in enumerate(to_uint8(load_digits(16, 1))):
            Image.fromarray(img[0].numpy(), "L").save(folder / f"{i:04d}.png")
        done.touch()
    return folder


def train_peer(args, work: Path) -> Path:
    """Its ``Trainer``, defaults but for what must match bdm's rows (batch, lr, float32, no flips, images seen):
    it saves model-<k>.pt at each milestone. A stopped run starts over: its Trainer writes no loss record along the
    way, and the loss curve and the minutes need the whole run (losses.json is written at the end)."""
    from denoising_diffusion_pytorch import Trainer

    out = work / slug(PEER)
    steps = milestones(args)
    losses_file = out / "losses.json"
    if losses_file.exists() and all((out / f"model-{k}.pt").exists() for k in range(1, len(steps) + 1)):
        return out
    diffusion = peer_objects(args)
    trainer = Trainer(diffusion, str(digits_folder(work)), train_batch_size=args.batch_size, train_lr=args.lr,
                      train_num_steps=args.steps, save_and_sample_every=steps[0], num_samples=4,
                      results_folder=str(out), amp=False, calculate_fid=False, augment_horizontal_flip=False,
                      convert_image_to="L")
    print(f"[{PEER}] train from step {trainer.step} to {args.steps}", flush=True)
    t0 = time.perf_counter()
    trainer.train()
    with atomic_write(losses_file, "w") as f:
        json.dump({"losses": type(diffusion).losses, "seconds": time.perf_counter() - t0}, f)
    return out


def peer_log(run: Path) -> tuple[list[tuple[int, float]], float]:
    saved = json.loads((run / "losses.json").read_text())
    losses = saved["losses"]
    curve = [(i + 25, float(np.mean(losses[i:i + 25]))) for i in range(0, len(losses), 25)]
    return curve, saved["seconds"] / 60


# -- scoring -----------------------------------------------------------------------------------------------------

class Scores:
    """FID, KID and the spectrum statistics of sample sets against the digits, cached in <work>/scores.json."""

    def __init__(self, work: Path, args):
        self.path, self.args = work / "scores.json", args
        self.values = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.inception = fid.inception(2048, WEIGHTS, "cpu")
        self.data = load_digits(16, 1)[: 200 if args.smoke else None]
        cached = work / "digits_feats.npy"  # the reference's features: minutes of Inception, computed once
        if not cached.exists():
            with atomic_write(cached, "wb") as f:
                np.save(f, self.feats_of(self.data))
        self.data_feats = np.load(cached)
        self.data_moments = self.data_feats.mean(0), np.cov(self.data_feats, rowvar=False)
        self.data_stats = image_statistics(self.data)

    def feats_of(self, x: torch.Tensor) -> np.ndarray:
        """Inception pool3 features of [-1, 1] images, quantised as a PNG holds them (what `bdm fid` sees)."""
        batches = (fid.as_inception_input(part) for part in x.split(200))
        return fid.features(self.inception, batches, 2048, "cpu").rows.astype(np.float64)

    def metrics(self, feats: np.ndarray, x: torch.Tensor, ref_feats: np.ndarray, ref_stats: dict, subsets: int) -> dict:
        ref_mu, ref_sigma = self.moments(ref_feats)
        value = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref_mu, ref_sigma)
        kid, kid_std = fid.kernel_distance(feats, ref_feats, subsets=subsets, subset_size=self.args.kid_subset_size)
        return {"fid": value, "kid": kid, "kid_std": kid_std, "n": len(x), **compare(x, ref_stats)}

    def moments(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of features; the digits' (every row's reference) are computed once."""
        return self.data_moments if feats is self.data_feats else (feats.mean(0), np.cov(feats, rowvar=False))

    def get(self, key: str, draw, n: int) -> dict:
        """Metrics of ``n`` samples from ``draw()``; the curve's point (the first ``curve_n`` of them) comes with it."""
        keys = {n: f"{key} n={n}", self.args.curve_n: f"{key} n={self.args.curve_n}"}
        if any(k not in self.values for k in keys.values()):
            t0 = time.perf_counter()
            x = draw()
            t1 = time.perf_counter()
            feats = self.feats_of(x)
            for m, k in sorted(keys.items()):
                subsets = self.args.kid_subsets if m == n else max(self.args.kid_subsets // 5, 1)
                self.values[k] = {**self.metrics(feats[:m], x[:m], self.data_feats, self.data_stats, subsets),
                                  "sample_s": (t1 - t0) * m / n, "score_s": (time.perf_counter() - t1) * m / n}
            v = self.values[keys[n]]
            print(f"{keys[n]}: FID {v['fid']:.2f} KID {v['kid'] * 1e3:.2f}e-3 saturated {v['saturated']:.2f}x "
                  f"std {v['std']:.2f}x DCT low {v['dct_low']:.2f}x high {v['dct_high']:.2f}x "
                  f"({t1 - t0:.0f} + {time.perf_counter() - t1:.0f} s)", flush=True)
            self.save()
        return self.values[keys[n]]

    def curve_point(self, key: str) -> dict:
        return self.values[f"{key} n={self.args.curve_n}"]

    def save(self) -> None:
        with atomic_write(self.path, "w") as f:
            json.dump(self.values, f, indent=1)

    def floor(self) -> dict:
        """Two halves of the digits (even and odd indices) against each other."""
        if "floor" not in self.values:
            a, b = self.data[0::2], self.data[1::2]
            fa, fb = self.data_feats[0::2], self.data_feats[1::2]
            self.values["floor"] = {**self.metrics(fa, a, fb, image_statistics(b), self.args.kid_subsets), "n_ref": len(b)}
            self.save()
        return self.values["floor"]

    def of_bdm(self, ckpt: Path, label: str, n: int, sampler: str | None = None, steps: int | None = None) -> dict:
        sampler, steps = sampler or self.args.sampler, steps or self.args.sample_steps

        def draw():
            r = load_run(ckpt, device="cpu")
            return torch.cat(list(sample_batches(r, n, steps=steps, sampler=sampler, batch_size=500)))
        return self.get(f"{label} {sampler} {steps}", draw, n)

    def of_peer(self, run: Path, milestone: int, label: str, n: int) -> dict:
        def draw():
            from ema_pytorch import EMA

            diffusion = peer_objects(self.args)
            ema = EMA(diffusion, beta=0.995, update_every=10)
            ema.load_state_dict(torch.load(run / f"model-{milestone}.pt", map_location="cpu", weights_only=True)["ema"])
            model = ema.ema_model.eval()
            torch.manual_seed(0)
            parts = []
            with torch.inference_mode():
                for start in range(0, n, 500):
                    parts.append(model.sample(batch_size=min(500, n - start)).float() * 2 - 1)
            return torch.cat(parts).clamp(-1, 1)
        return self.get(f"{label} ddim {self.args.peer_sample_steps}", draw, n)


# -- the study ---------------------------------------------------------------------------------------------------

def run(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    steps = milestones(args)
    scores = Scores(work, args)
    rows: dict[str, dict] = {}

    def bdm_row(name: str, sigma: float, blur: str) -> None:
        t0 = time.perf_counter()
        run_dir = train_bdm(name, sigma, blur, args, work)
        curve = [(s, scores.of_bdm(run_dir / f"step_{s:06d}.pt", f"{name} step {s}", args.curve_n)) for s in steps[:-1]]
        final = scores.of_bdm(run_dir / f"step_{steps[-1]:06d}.pt", f"{name} step {steps[-1]}", args.n)
        curve.append((steps[-1], scores.curve_point(f"{name} step {steps[-1]} {args.sampler} {args.sample_steps}")))
        loss, minutes = bdm_log(run_dir, args.batch_size)
        rows[name] = {"final": final, "curve": curve, "loss": loss, "train_min": minutes, "params": params_of(run_dir),
                      "grid": str(run_dir / f"step_{steps[-1]:06d}.pt"), "wall_min": (time.perf_counter() - t0) / 60}

    for sigma in BLURS:
        bdm_row(f"bdm, blur {sigma:g} (sin2)", sigma, "sin2")
    nonzero = [k for k in rows if not k.startswith("bdm, blur 0 ")]
    best = min(nonzero, key=lambda k: rows[k]["final"]["kid"])
    best_sigma = float(best.split("blur ")[1].split(" ")[0])
    bdm_row(f"bdm, blur {best_sigma:g} (linear)", best_sigma, "linear")
    if args.peer:
        t0 = time.perf_counter()
        peer = train_peer(args, work)
        curve = [(s, scores.of_peer(peer, k + 1, f"{PEER} step {s}", args.curve_n)) for k, s in enumerate(steps[:-1])]
        final = scores.of_peer(peer, len(steps), f"{PEER} step {steps[-1]}", args.n)
        curve.append((steps[-1], scores.curve_point(f"{PEER} step {steps[-1]} ddim {args.peer_sample_steps}")))
        loss, minutes = peer_log(peer)
        rows[PEER] = {"final": final, "curve": curve, "loss": loss, "train_min": minutes,
                      "params": sum(p.numel() for p in peer_objects(args).model.parameters()),
                      "wall_min": (time.perf_counter() - t0) / 60}
    result = {"settings": settings(args), "rows": rows, "floor": scores.floor(), "best_blur": best, "machine": machine()}
    if args.sweep_n:
        result["sweep"] = {"model": best, **sweep(Path(rows[best]["grid"]), best, scores, args)}
    if args.demo:
        result["demo"] = score_demo(Path(args.demo), scores, args)
    grids(result, scores, args)
    with atomic_write(work / "study.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


SWEEP_SAMPLERS = ("ancestral", "ddim", "heun", "dpmpp-2m", "unipc")
SWEEP_NFE = (5, 10, 20, 50)


def sweep(ckpt: Path, label: str, scores: Scores, args) -> dict:
    """Item 9 (issue #11): every sampler at 5, 10, 20 and 50 network evaluations (``engine.nfe``; Heun: the nearest even
    count), and ancestral at 1,000 steps, on one converged model; ``--sweep-n`` samples each."""
    from bdm_cli.engine import nfe

    table: dict[str, dict[int, dict]] = {}
    for sampler in SWEEP_SAMPLERS:
        for e in SWEEP_NFE:
            k = e if sampler == "ancestral" else e // 2 if sampler == "heun" else e - 1  # the ODE's last call is at t = 0
            table.setdefault(sampler, {})[nfe(sampler, k)] = scores.of_bdm(ckpt, label, args.sweep_n, sampler, k)
    table["ancestral"][1000] = scores.of_bdm(ckpt, label, args.sweep_n, "ancestral", 1000)
    return {"n": args.sweep_n, "table": table}


def score_demo(out: Path, scores: Scores, args) -> dict:
    """The run `make demo` wrote (``runs/demo`` or a path), scored like the rows at its own sampler settings."""
    ckpt = out / "checkpoint.pt" if out.is_dir() else out
    r = load_run(ckpt, device="cpu")
    cfg = r.cfg

    def draw():
        return torch.cat(list(sample_batches(r, args.n, batch_size=500)))

    key = f"demo {ckpt.stat().st_mtime_ns} {cfg.sample.sampler} {cfg.sample.steps}"
    return {**scores.get(key, draw, args.n), "sampler": cfg.sample.sampler, "steps": cfg.sample.steps, "train_steps": r.step,
            "sigma_blur_max": cfg.diffusion.sigma_blur_max}


def params_of(run_dir: Path) -> int:
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return sum(v.numel() for v in state["model"].values())


def settings(args) -> dict:
    keys = ("steps", "batch_size", "lr", "warmup", "checkpoints", "n", "curve_n", "sampler", "sample_steps",
            "peer_sample_steps", "peer_dim", "kid_subsets", "kid_subset_size", "sweep_n", "smoke")
    return {k: getattr(args, k) for k in keys}


def machine() -> str:
    from bdm_cli.runtime import bf16_native

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    avx = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2" if Path("/proc/cpuinfo").exists() else ""
    return (f"{cpu} ({avx}, {'native' if bf16_native(torch.device('cpu')) else 'no native'} bf16; float32 used), "
            f"{os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}")


def grids(result: dict, scores: Scores, args) -> None:
    """docs/study_samples.png: 32 samples of every row (the best sampler settings of the table) beside 32 digits."""
    if args.smoke:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data (digits)", scores.data[:32])]
    for name, row in result["rows"].items():
        if "grid" in row:
            r = load_run(Path(row["grid"]), device="cpu")
            panels.append((name, next(sample_batches(r, 32, steps=args.sample_steps, sampler=args.sampler))))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6), dpi=120)
    for ax, (name, x) in zip(axes, panels):
        ax.imshow(make_grid(x, nrow=4).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=-1, vmax=1)  # make_grid keeps [-1, 1]
        ax.set_title(name.replace("bdm, ", ""), fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    with atomic_write(ROOT / "docs" / "study_samples.png", "wb") as f:
        fig.savefig(f, format="png")
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=120)
    for name, row in result["rows"].items():
        per = args.batch_size
        a1.plot([s * per for s, _ in row["loss"]], [v for _, v in row["loss"]], lw=1, label=name)
        a2.plot([s * per for s, _ in row["curve"]], [c["fid"] for _, c in row["curve"]], "o-", ms=3, label=name)
        a3.plot([s * per for s, _ in row["curve"]], [c["kid"] * 1e3 for _, c in row["curve"]], "o-", ms=3, label=name)
    a2.axhline(result["floor"]["fid"], color="k", ls=":", lw=1, label="floor (two halves of the digits)")
    a3.axhline(result["floor"]["kid"] * 1e3, color="k", ls=":", lw=1)
    a1.set(yscale="log", xlabel="images seen", ylabel="training loss (each library's own)", title="loss")
    a2.set(xlabel="images seen", ylabel=f"FID (n={args.curve_n})", title="FID against images seen")
    a3.set(xlabel="images seen", ylabel=f"KID x 1e3 (n={args.curve_n})", title="KID against images seen")
    a2.legend(fontsize=6)
    fig.tight_layout()
    with atomic_write(ROOT / "docs" / "study_curves.png", "wb") as f:
        fig.savefig(f, format="png")
    if "sweep" in result:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for sampler, row in result["sweep"]["table"].items():
            pts = sorted((int(e), v["fid"]) for e, v in row.items() if int(e) <= 100)
            ax.plot([e for e, _ in pts], [v for _, v in pts], "o-", ms=3, label=sampler)
        anc = {int(e): v for e, v in result["sweep"]["table"]["ancestral"].items()}[1000]["fid"]
        ax.axhline(anc, color="k", ls=":", lw=1, label="ancestral, 1,000 steps")
        ax.axhline(result["floor"]["fid"], color="gray", ls="--", lw=1, label="floor")
        ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel=f"FID (n={result['sweep']['n']})",
               title=f"{result['sweep']['model']}: samplers")
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_write(ROOT / "docs" / "study_samplers.png", "wb") as f:
            fig.savefig(f, format="png")
    plt.close("all")


# -- the report --------------------------------------------------------------------------------------------------

def report(r: dict, command: str) -> str:
    st = r["settings"]
    images = st["steps"] * st["batch_size"]
    fl = r["floor"]

    def cells(v: dict) -> str:
        return (f"{v['fid']:.2f} | {v['kid'] * 1e3:.2f} ± {v['kid_std'] * 1e3:.2f} | {v['saturated']:.2f}x | {v['std']:.2f}x | "
                f"{v['dct_low']:.2f}x | {v['dct_high']:.2f}x")

    lines = [MARKERS[0], "## 8. The converged study: digits, blur against no blur, beside denoising-diffusion-pytorch", "",
             f"Measured on {r['machine']}.", f"Reproduce: `{command}` (resumes from its caches under runs/study).", "",
             f"Every model: the `digits` preset's network, {st['steps']:,} steps x batch {st['batch_size']} = {images:,} images seen "
             f"({images / 1797:.0f} epochs of the 1,797 digits at 16x16), lr {st['lr']:g}, warm-up {st['warmup']}, float32; "
             f"bdm rows identical but for the blur (same seed, data order and noise), sampled with {st['sampler']} at "
             f"{st['sample_steps']} steps. {PEER}: its `Trainer` with its defaults (v-prediction, sigmoid schedule, EMA 0.995 "
             f"every 10 steps) on the same 16x16 images, batch, lr, precision and images seen, no flips, sampled with its "
             f"DDIM at {st['peer_sample_steps']} steps. FID and KID (Inception pool3, KID: mean ± std over "
             f"{st['kid_subsets']} subsets of {st['kid_subset_size']}) of {st['n']:,} samples against the 1,797 digits; the "
             "ratios are sample statistics over the data's (1.00x is the data): pixels with |x| > 0.9, pixel std, and the "
             "DCT std of the lowest and the highest tenth of the frequencies.", "",
             "| model | parameters | FID | KID x 1e3 | saturated | pixel std | DCT low | DCT high | training | scoring |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        v = row["final"]
        lines.append(f"| {name} | {row['params'] / 1e6:.2f}M | {cells(v)} | {row['train_min']:.1f} min | "
                     f"{(v['sample_s'] + v['score_s']) / 60:.1f} min |")
    lines.append(f"| floor: two halves of the digits ({fl['n']} against {fl['n_ref']}) | | {cells(fl)} | | |")
    lines += ["", "Training and scoring minutes are wall time as measured, each when its row was first computed (later runs "
              "reuse the caches): a row computed while the machine ran other jobs shows more minutes than the work needs."]
    best_bdm = min((k for k in r["rows"] if k != PEER), key=lambda k: r["rows"][k]["final"]["kid"])
    b = r["rows"][best_bdm]["final"]
    lines += ["", f"Best bdm row by KID: {best_bdm} (FID {b['fid']:.2f}, KID {b['kid'] * 1e3:.2f}e-3; "
              f"{b['fid'] / fl['fid']:.2f}x the floor's FID)."]
    if PEER in r["rows"]:
        p = r["rows"][PEER]["final"]
        ahead = b["kid"] <= p["kid"] + p["kid_std"]
        lines.append(f"Against {PEER} at equal images seen: KID {b['kid'] * 1e3:.2f}e-3 against {p['kid'] * 1e3:.2f}e-3 "
                     f"(± {p['kid_std'] * 1e3:.2f}), FID {b['fid']:.2f} against {p['fid']:.2f}: "
                     + ("bdm is at least as good." if ahead else
                        f"bdm is behind by {(b['kid'] - p['kid']) * 1e3:.2f}e-3 in KID."))
    lines += ["", "Converged? Loss, FID and KID against images seen, at every checkpoint "
              f"(FID and KID of {st['curve_n']:,} samples; the dotted line is the floor):", "",
              "| model | " + " | ".join(f"{s * st['batch_size'] // 1000}k images" for s, _ in
                                         next(iter(r["rows"].values()))["curve"]) + " |",
              "|---|" + "---|" * len(next(iter(r["rows"].values()))["curve"])]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c['fid']:.1f} / {c['kid'] * 1e3:.1f}" for _, c in row["curve"]) + " |")
    lines += ["", "(FID / KID x 1e3.)", "", "![loss, FID and KID against images seen](study_curves.png)", "",
              "![32 samples of every row beside 32 digits](study_samples.png)", ""]
    if "sweep" in r:
        sw = r["sweep"]
        nfes = sorted({int(e) for row in sw["table"].values() for e in row})
        lines += ["## 9. Samplers against network evaluations (the converged model)", "",
                  f"{sw['model']} of item 8; {sw['n']:,} samples per setting against the 1,797 digits; FID / KID x 1e3 / "
                  "DCT std of the highest tenth of the frequencies over the data's, by network evaluations (NFE: one a "
                  "step, heun two, and the deterministic samplers one more at t = 0).", "",
                  "| sampler | " + " | ".join(str(e) for e in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for sampler, row in sw["table"].items():
            by = {int(e): v for e, v in row.items()}
            lines.append(f"| {sampler} | " + " | ".join(
                f"{by[e]['fid']:.2f} / {by[e]['kid'] * 1e3:.2f} / {by[e]['dct_high']:.2f}x" if e in by else "" for e in nfes) + " |")
        anc = {int(e): v for e, v in sw["table"]["ancestral"].items()}[1000]
        uni = {int(e): v for e, v in sw["table"]["unipc"].items()}.get(20)
        if uni is not None:
            ratio = uni["fid"] / anc["fid"]
            lines += ["", f"unipc at 20 NFE: FID {uni['fid']:.2f} against ancestral at 1,000 steps {anc['fid']:.2f}: {ratio:.2f}x "
                      f"(goal <= 1.10: {'met' if ratio <= 1.10 else 'not met'}); KID {uni['kid'] * 1e3:.2f}e-3 against "
                      f"{anc['kid'] * 1e3:.2f}e-3.", "", "![FID against network evaluations](study_samplers.png)", ""]
    if "demo" in r:
        d = r["demo"]
        ok = all(abs(d[k] - 1) <= 0.15 for k in ("saturated", "dct_low", "dct_high")) and d["fid"] <= 2 * fl["fid"]
        lines += ["### The demo", "", f"`make demo`'s run ({d['train_steps']} steps, sigma_blur_max {d['sigma_blur_max']:g}, "
                  f"{d['sampler']} {d['steps']} steps), {d['n']:,} samples:", "",
                  "| | FID | KID x 1e3 | saturated | pixel std | DCT low | DCT high |", "|---|---|---|---|---|---|---|",
                  f"| demo | {cells(d)} |", f"| floor | {cells(fl)} |", "",
                  f"Goal (issue #10): saturated fraction and both DCT ratios within 15% of the data's, FID within 2x of "
                  f"the floor: {'met' if ok else 'not met'}.", ""]
    lines.append(MARKERS[1])
    return "\n".join(lines)


def write_section(text: str, path: Path, markers: tuple[str, str] = MARKERS) -> None:
    """Put a section between ``markers`` into docs/benchmarks.md, replacing the previous one (bench/run.py keeps it):
    the study's, or bench/gpu.py's."""
    page = path.read_text() if path.exists() else "# Benchmarks\n"
    if markers[0] in page and markers[1] in page:
        head, rest = page.split(markers[0], 1)
        page = head + text + rest.split(markers[1], 1)[1]
    else:
        page = page.rstrip("\n") + "\n\n" + text + "\n"
    with atomic_write(path, "w") as f:
        f.write(page)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default=None, help="trainings and scores are kept here (runs/study; runs/study-smoke with --smoke, "
                   "whose toy runs and 200-digit reference would otherwise be resumed and read by the real study)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints scored for the curves, the last the end")
    p.add_argument("--n", type=int, default=2000, help="samples of the final scores")
    p.add_argument("--curve-n", type=int, default=250, help="samples at each checkpoint of the curves")
    p.add_argument("--sampler", default="unipc", help="the bdm rows' sampler (item 9 compares them all)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--peer-sample-steps", type=int, default=50, help="its DDIM steps (network evaluations)")
    p.add_argument("--peer-dim", type=int, default=20, help="its Unet's dim (20: 0.35M parameters, the digits preset 0.37M)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--no-peer", dest="peer", action="store_false")
    p.add_argument("--sweep-n", type=int, default=2000, help="samples per sampler setting of item 9 (0: skip it)")
    p.add_argument("--demo", default=None, help="also score this run directory (make demo's: runs/demo)")
    p.add_argument("--smoke", action="store_true", help="a toy scale that checks the code in about a minute")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--out", default=None, help="the report's section goes here (docs/benchmarks.md; with --smoke, "
                   "benchmarks.md in --work: toy figures never replace the study's)")
    args = p.parse_args()
    args.work = args.work or str(ROOT / "runs" / ("study-smoke" if args.smoke else "study"))
    args.out = args.out or str(Path(args.work) / "benchmarks.md" if args.smoke else ROOT / "docs" / "benchmarks.md")
    if not WEIGHTS.exists():
        sys.exit(f"needs {WEIGHTS} (../shared beside the checkout)")
    if args.smoke:
        args.steps, args.checkpoints, args.n, args.curve_n, args.sample_steps, args.peer_sample_steps = 20, 2, 40, 20, 5, 5
        args.kid_subsets, args.kid_subset_size, args.sweep_n = 5, 10, min(args.sweep_n, 20)
    result = run(args)
    text = report(result, "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    write_section(text, Path(args.out))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()

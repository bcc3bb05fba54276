"""The training loop (``bdm train``): read it top to bottom in one screen.

t ~ U(0, 1) per example, the paper's eps-MSE loss, Adam with warm-up and gradient clipping,
an EMA of the weights (a lerp, as in EDM), bf16 autocast where the device has native bf16, channels_last on CUDA,
DistributedDataParallel under torchrun, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, write_config
from .config import Config, to_dict
from .data import collate_valid, make_dataset
from .engine import dct2, eps_loss, precondition, sample
from .errors import UserError
from .io import make_grid, save_png
from .unet import build_model

__all__ = ["lr_at", "ema_update", "train", "preview_grid", "StepBatches", "resolve_device", "Dist", "data_stats",
           "denoised_range"]


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then constant (DDPM)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class StepBatches(torch.utils.data.Sampler):
    """Index batches as a pure function of (seed, step): epoch ``e`` is ``randperm(n, seed + e)`` cut into
    global batches; each of ``world`` ranks takes its slice. Starting at any step reproduces the
    stream exactly, which is what makes resume bit-exact (and plays DistributedSampler's part)."""

    def __init__(self, n: int, batch: int, seed: int, start: int, steps: int, rank: int = 0, world: int = 1):
        if n < batch:
            raise UserError(f"the dataset has {n} images, fewer than one batch of {batch}")
        self.n, self.batch, self.seed, self.start, self.steps, self.rank, self.world = n, batch, seed, start, steps, rank, world
        self.per_epoch = n // batch

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self):
        perm, epoch = None, None
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                perm, epoch = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e)), e
            yield perm[k * self.batch : (k + 1) * self.batch][self.rank :: self.world].tolist()


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu" and not name.startswith("mps"):
        raise UserError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)")
    return torch.device(name)


def init_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: nccl on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(device_name, local).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local)


class _Stop:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's kill) set a flag that the loop checks between steps, so a stop ends
    with a consistent checkpoint: a KeyboardInterrupt raised at an arbitrary point could fire inside a lock (rich's
    live display) or half-way through an optimizer step. A second Ctrl-C interrupts at once; the last saved
    checkpoint is kept."""

    def __init__(self):
        self.requested: str | None = None  # the signal's name

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM)
        self._old = {s: signal.signal(s, self._handle) for s in signals} if _main_thread() else {}
        return self

    def _handle(self, signum, _frame):
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@torch.no_grad()
def data_stats(data, max_images: int = 10_000, batch: int = 500) -> dict[str, torch.Tensor]:
    """Per-frequency mean, variance, minimum and maximum of ``DCT(x)`` over (up to ``max_images`` of) the data,
    float32 [C, H, W]: the Gaussian of the preconditioner and the bounds of the samplers' x prediction."""
    idx = torch.linspace(0, len(data) - 1, min(len(data), max_images)).long().tolist()
    n, s1, s2, low, high = 0, 0.0, 0.0, None, None
    for i in range(0, len(idx), batch):
        x = collate_valid([data[j] for j in idx[i : i + batch]])
        if len(x):
            u = dct2(x.double())
            n, s1, s2 = n + len(u), s1 + u.sum(0), s2 + (u**2).sum(0)
            low = u.amin(0) if low is None else torch.minimum(low, u.amin(0))
            high = u.amax(0) if high is None else torch.maximum(high, u.amax(0))
    if n == 0:
        raise UserError("none of the dataset's images could be read")
    mean = s1 / n
    return {"mean_u": mean.float(), "var_u": (s2 / n - mean**2).clamp(min=1e-8).float(), "min_u": low.float(),
            "max_u": high.float()}


def denoised_range(stats: dict | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The data's per-frequency range that bounds the samplers' x prediction (engine ``sample(denoised_range=)``);
    None for checkpoints written before the range was stored."""
    if not stats or "min_u" not in stats:
        return None
    return stats["min_u"], stats["max_u"]


def preview_grid(ema, cfg: Config, device: torch.device, n: int, seed: int = 0, stats: dict | None = None) -> torch.Tensor:
    """An EMA sample grid with the engine's sampler at ``sample.preview_steps`` (same noise every time)."""
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(n, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, generator=g, device=device)
    x = sample(denoiser(ema, cfg, stats), noise, cfg.diffusion, cfg.sample.preview_steps,
               sampler=cfg.sample.sampler, grid=cfg.sample.grid or None, generator=g, denoised_range=denoised_range(stats))
    return make_grid(x.clamp(-1, 1).float().cpu())


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX-512/AMX bf16 through oneDNN. Elsewhere
    bf16 is emulated and slower than float32, so autocast stays off."""
    return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_network(net, device: torch.device, enabled: bool):
    """``net`` under bf16 autocast when enabled and ``device`` does bf16 natively: bf16 only inside the network,
    the DCT and the loss stay in float32. On a 2-core AVX-512 BF16 CPU it trains cifar10_cpu 2.0x faster and
    digits 1.5x (bench/, docs/benchmarks.md); very small nets (the tiny preset) are slower, so it turns it off."""
    if not (enabled and bf16_native(device)):
        return net

    def network(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return net(z, t)

    return network


def denoiser(net, cfg: Config, stats: dict | None):
    """The eps predictor the engine trains and samples: the network, preconditioned when the config says so."""
    if not (cfg.model.precondition and stats):
        return net
    return precondition(net, cfg.diffusion, stats["mean_u"], stats["var_u"])


def final_grid(ema, cfg: Config, device: torch.device, seed: int = 0, stats: dict | None = None) -> torch.Tensor:
    """``sample.n`` EMA samples at the full ``sample.steps`` of the preset's sampler."""
    full = replace(cfg, sample=replace(cfg.sample, preview_steps=cfg.sample.steps))
    return preview_grid(ema, full, device, cfg.sample.n, seed, stats)


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def train(cfg: Config, run_dir: Path, *, resume: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` (``checkpoint.pt``, ``config.yaml``, ``metrics.jsonl``, ``samples/``).

    ``progress`` is called on rank 0 after every step with ``{step, steps, loss, images_per_s}``.
    Returns ``{step, loss, interrupted, device, world, model, ema}`` (the last two: the trained modules).
    """
    tc = cfg.train
    ddp = init_distributed(tc.device)
    device = resolve_device(tc.device, ddp.local_rank)
    cuda, run_dir = device.type == "cuda", Path(run_dir)
    if tc.batch_size % ddp.world:
        raise UserError(f"train.batch_size {tc.batch_size} must be divisible by the {ddp.world} processes")
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    torch.manual_seed(tc.seed + ddp.rank)  # dropout differs per rank
    gen = torch.Generator(device).manual_seed(tc.seed * 1000 + ddp.rank)  # t, noise and flips
    step = 0
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT)
        _load_weights(model, state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        step = int(state["step"])
        rng = state["rng"]
        if len(rng["gen"]) == ddp.world:
            gen.set_state(rng["gen"][ddp.rank]), torch.set_rng_state(rng["torch"][ddp.rank])
    if cuda:
        model, ema = model.to(memory_format=torch.channels_last), ema.to(memory_format=torch.channels_last)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if ddp.world > 1 else model

    network = bf16_network(net, device, tc.bf16)
    schedule = cfg.diffusion
    data = make_dataset(cfg.data.dataset, cfg.data.resolution, cfg.data.channels, cfg.data.split)
    stats = (state.get("data_stats") if resume else None) or data_stats(data)
    stats = {k: v.to(device) for k, v in stats.items()} if stats else None
    eps_model = denoiser(network, cfg, stats)
    batches = StepBatches(len(data), tc.batch_size, tc.seed, step, tc.steps, ddp.rank, ddp.world)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.data.num_workers, pin_memory=cuda,
                                         collate_fn=collate_valid, generator=torch.Generator())  # keeps the global RNG untouched
    if ddp.main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
    writer = _tensorboard(run_dir) if ddp.main else None

    def gathered(state: torch.Tensor) -> list[torch.Tensor]:
        if ddp.world == 1:
            return [state]
        local = state.to(device)
        out = [torch.empty_like(local) for _ in range(ddp.world)]
        dist.all_gather(out, local)
        return [o.cpu() for o in out]

    def checkpoint() -> None:
        rng = {"gen": gathered(gen.get_state()), "torch": gathered(torch.get_rng_state())}
        if ddp.main:
            save_checkpoint(run_dir / CHECKPOINT, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                                   "step": step, "config": to_dict(cfg), "rng": rng,
                                                   "data_stats": {k: v.cpu() for k, v in stats.items()} if stats else {}})

    loss_sum, loss_n, last_loss, stopped_by = torch.zeros((), device=device), 0, math.nan, None
    skipped_batches = skipped_images = 0
    tick, tick_step = time.perf_counter(), step
    with _Stop() as stop:
        for x in loader:
            skipped_images += tc.batch_size // ddp.world - len(x)  # undecodable files (warned by the dataset)
            if len(x) == 0:
                continue
            x = x.to(device, non_blocking=True)
            b = x.shape[0]
            if cfg.data.hflip:
                x = torch.where(torch.rand(b, 1, 1, 1, generator=gen, device=device) < 0.5, x.flip(-1), x)
            t = torch.rand(b, generator=gen, device=device)
            noise = torch.randn(x.shape, generator=gen, device=device)
            if cuda:
                x, noise = x.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc.lr, tc.warmup)
            loss = eps_loss(eps_model, x, t, noise, schedule)
            if not _all_finite(loss, ddp):  # checked before the update, so no NaN reaches the weights
                if not tc.skip_nonfinite:
                    raise UserError(f"the loss is {loss.item()} at step {step + 1}; stopped, the last checkpoint is kept "
                                    "(--set train.skip_nonfinite=true skips such batches)")
                skipped_batches += 1
                step += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            ema_update(ema, model, tc.ema_decay)
            step += 1
            loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1
            if _every(step, tc.log_every) or step == tc.steps:
                last_loss = (loss_sum / max(loss_n, 1)).item()
                now = time.perf_counter()
                ips = (step - tick_step) * tc.batch_size / max(now - tick, 1e-9)
                tick, tick_step, loss_sum, loss_n = now, step, torch.zeros((), device=device), 0
                if ddp.main:
                    _log(run_dir, writer, {"step": step, "loss": last_loss, "lr": opt.param_groups[0]["lr"], "images_per_s": ips,
                                           "skipped_batches": skipped_batches, "skipped_images": skipped_images})
                    if progress:
                        progress({"step": step, "steps": tc.steps, "loss": last_loss, "images_per_s": ips})
            elif ddp.main and progress:
                progress({"step": step, "steps": tc.steps})
            if _every(step, tc.sample_every) and ddp.main:
                save_png(preview_grid(ema, cfg, device, cfg.sample.n, stats=stats), run_dir / "samples" / f"step_{step:06d}.png")
            if _every(step, tc.checkpoint_every):
                checkpoint()
            if stop.requested:
                stopped_by = stop.requested
                break
    checkpoint()
    if writer:
        writer.close()
    if ddp.main and stopped_by is None and step >= tc.steps and tc.steps > 0:
        save_png(final_grid(ema, cfg, device, stats=stats), run_dir / "samples" / "final.png")
    return {"step": step, "loss": last_loss, "interrupted": stopped_by is not None, "stopped_by": stopped_by,
            "skipped_batches": skipped_batches, "skipped_images": skipped_images, "device": str(device), "world": ddp.world,
            "model": model, "ema": ema}


def _all_finite(loss: torch.Tensor, ddp: Dist) -> bool:
    """Whether the loss is finite on every rank (ranks must agree to skip a step together)."""
    finite = torch.isfinite(loss.detach()).float()
    if ddp.world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _load_weights(model: torch.nn.Module, state: dict) -> None:
    """load_state_dict with a one-line message naming the first mismatch (another config's checkpoint)."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise UserError(f"checkpoint does not fit this model: unexpected weight {key!r} (was it trained with another config?)")
        if own[key].shape != value.shape:
            raise UserError(f"checkpoint does not fit this model: {key} has shape {tuple(value.shape)} in the checkpoint, "
                            f"{tuple(own[key].shape)} in the model (was it trained with another config?)")
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(f"checkpoint does not fit this model: weight {missing[0]!r} is missing (another config?)")
    model.load_state_dict(state)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _log(run_dir: Path, writer, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**record, "time": time.time()}) + "\n")
    if writer:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, record["step"])

"""The training loop (``bdm train``): read it top to bottom in one screen.

t ~ U(0, 1) per example, the paper's eps-MSE loss, Adam with warm-up and gradient clipping,
an EMA of the weights (a lerp, as in EDM), bf16 autocast where the device has native bf16, channels_last on CUDA,
DistributedDataParallel under torchrun, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .checkpoint import CHECKPOINT, CheckpointError, check_data_stats, check_resumable, load_checkpoint, save_checkpoint, write_config
from .config import Config, from_dict, to_dict
from .data import collate_valid, dataset_fingerprint, make_dataset
from .engine import NonFiniteOutput, dct2, eps_loss, sample
from .errors import AgreedError, UsageError, UserError, raise_if_interrupted
from .io import TEMP_SUFFIX, atomic_write, make_grid, naming, remove_stale_temps, save_image
from .paths import blocking_file, not_a_folder
from .runtime import bf16_network, compiled, denoised_range, denoiser, load_weights, resolve_device, seed_of
from .unet import build_model

__all__ = ["lr_at", "ema_update", "nonfinite", "make_optimizer", "train_step", "train", "preview_grid", "StepBatches", "Dist", "data_stats", "check_new_run_dir",
           "empty_unstarted_run"]



class RunLocked(UserError):
    """Another ``bdm train`` holds the run folder's lock: the folder is that process's, not to be touched."""


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then constant (DDPM)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float | torch.Tensor) -> None:
    """``ema <- ema + (1 - decay) (model - ema)`` for parameters (a lerp, as in EDM), as three foreach kernels;
    buffers are copied. ``decay`` may be a 0-d tensor on the device (1 where a step was skipped): foreach_lerp_ takes
    no tensor weight (it would read it to the host, a sync), foreach_mul_ does."""
    ema_params = list(ema.parameters())
    weight = torch.as_tensor(1 - decay, dtype=torch.float32, device=ema_params[0].device)
    delta = torch._foreach_sub([p.detach() for p in model.parameters()], ema_params)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema_params, delta)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def nonfinite(loss: torch.Tensor, params: list[torch.Tensor], grad_clip: float) -> torch.Tensor:
    """1.0 where this step must not reach the weights (a NaN/inf loss or gradient), else 0.0: a 0-d float32 tensor on
    the loss's device, so the check costs no host-device synchronisation. Clips the gradients to ``grad_clip``
    (0: no clipping) on the way, since both need the gradient norm."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0
            else torch.nn.utils.get_total_norm(grads))
    return (~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float()


def make_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per update, and it skips a non-finite step on the device (``found_inf``)."""
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)


def train_step(eps_model, model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               t: torch.Tensor, noise: torch.Tensor, schedule, *, lr: float, grad_clip: float, ema_decay: float,
               distributed: bool = False, unread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One update from a batch, entirely on the device: the eps loss, backward, clipping, the fused AdamW step and
    the EMA. A non-finite loss or gradient skips the update and the EMA without a host sync; so does ``unread``
    (no image of this rank's share could be read and ``x`` stands in for it: the rank still takes part in the
    step's collectives, which it would otherwise leave out of step with the other ranks'). Both are agreed over the
    ranks. Returns ``(loss, skipped)``: a 0-d tensor, and ``[non-finite, unread]`` (1.0 where it happened on any
    rank). ``opt`` must be fused (it reads ``found_inf``)."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = eps_loss(eps_model, x, t, noise, schedule, check_t=False)  # the loop draws t = torch.rand: no device read
    opt.zero_grad(set_to_none=True)
    loss.backward()
    bad = nonfinite(loss, list(model.parameters()), grad_clip)
    skipped = torch.stack([bad, torch.full_like(bad, float(unread))])  # a fill, not a copy from the host: no sync
    if distributed:  # ranks skip together (an asynchronous collective, no host sync)
        dist.all_reduce(skipped, op=dist.ReduceOp.MAX)
    skip = skipped.amax()
    opt.found_inf = skip  # the fused optimizer skips the update on the device where it is 1 (GradScaler's hook)
    opt.step()
    ema_update(ema, model, torch.where(skip > 0, 1.0, ema_decay))  # a skipped step leaves the EMA as it is
    return loss.detach(), skipped


class StepBatches(torch.utils.data.Sampler):
    """Index batches as a pure function of (seed, step): epoch ``e`` is ``randperm(n)`` drawn from a hash of (seed, e), cut into
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
                perm, epoch = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_of("epoch", self.seed, e))), e
            yield perm[k * self.batch : (k + 1) * self.batch][self.rank :: self.world].tolist()


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False  # started by torchrun: a process group and DistributedDataParallel, even for one process
    owns_group: bool = False  # the group was made here (not by a caller who set one up): train() ends it

    @property
    def main(self) -> bool:
        return self.rank == 0


def whole(text: str) -> bool:
    """A whole number in ASCII digits (``"²".isdigit()`` is true, and ``int("١")`` is 1)."""
    return text.isascii() and text.isdigit()


def init_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: nccl on GPUs, gloo on CPUs (also for one process, so that
    ``torchrun --nproc_per_node 1`` runs the same DistributedDataParallel path as eight)."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    given = [k for k in names if os.environ.get(k)]
    if not given:
        return Dist()
    values = {k: os.environ.get(k, "") for k in names[:3]}
    if missing := [k for k in names if k not in given and k != "LOCAL_RANK"]:  # torchrun sets them all
        raise UserError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set but not {', '.join(missing)}: run several "
                        f"processes with torchrun (it sets them all), or unset {', '.join(given)} for one process")
    if not all(whole(v) for v in values.values() if v) or int(values["RANK"]) >= int(values["WORLD_SIZE"] or 0):
        raise UserError(f"torchrun's variables do not fit: WORLD_SIZE={values['WORLD_SIZE']!r} RANK={values['RANK']!r} "
                        f"LOCAL_RANK={values['LOCAL_RANK']!r} (whole numbers, RANK below WORLD_SIZE)")
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    if not (whole(port) and 1 <= int(port) <= 65535):  # torch's own errors are tracebacks from its rendezvous
        raise UserError(f"MASTER_PORT={port!r} is no port (a whole number in 1..65535)")
    try:  # an unknown host: torch retries it for minutes, printing C++ log lines
        socket.getaddrinfo(address, int(port))
    except (OSError, UnicodeError) as e:
        raise UserError(f"MASTER_ADDR={address!r} cannot be resolved ({getattr(e, 'strerror', None) or e}): give rank "
                        "0's host name or address") from None
    local = int(os.environ.get("LOCAL_RANK") or 0)
    cuda = resolve_device(device_name, local).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        _join_process_group("nccl" if cuda else "gloo", int(values["RANK"]), int(values["WORLD_SIZE"]), local if cuda else None)
    return Dist(dist.get_rank(), dist.get_world_size(), local, True, owns)


def _join_process_group(backend: str, rank: int, world: int, cuda_device: int | None) -> None:
    """``init_process_group`` waits (30 minutes) for every process in C++, where Ctrl-C and SIGTERM cannot reach
    it: it runs in a thread while this one waits, says what it waits for, and stops on a signal."""
    failed = []

    def join():
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)  # the current device is per thread
            dist.init_process_group(backend)
        except Exception as e:  # noqa: BLE001  re-raised below, in the caller's thread
            failed.append(e)

    joining = threading.Thread(target=join, name="bdm-rendezvous", daemon=True)  # a daemon: exit does not wait
    joining.start()
    start = time.monotonic()
    told = False
    while joining.is_alive():
        joining.join(0.2)
        raise_if_interrupted()  # a Ctrl-C that start-up lost: it would wait here for 30 minutes
        if not told and time.monotonic() - start > 10:
            told = True
            print(f"Waiting for all {world} processes (this is rank {rank}) at {os.environ.get('MASTER_ADDR')}:"
                  f"{os.environ.get('MASTER_PORT')}: start the others, or stop with Ctrl-C", file=sys.stderr, flush=True)
    if failed:
        e = failed[0]
        if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
            raise UserError(f"not all {world} processes joined at {os.environ.get('MASTER_ADDR')}:"
                            f"{os.environ.get('MASTER_PORT')} in time: start them all, with torchrun") from None
        raise e


# What stops a training with a checkpoint; SIGHUP: a closed terminal or a dropped ssh session, which would otherwise
# kill the run without one
SECOND_CTRL_C_AFTER = 1.0  # seconds
STOP_EVERY = 10  # steps between the ranks' agreements on a stop (a few seconds at most)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class _Stop:
    """Ctrl-C (SIGINT), SIGTERM (a scheduler's kill) and SIGHUP (a closed terminal) set a flag that the loop checks between steps, so a stop ends
    with a consistent checkpoint: a KeyboardInterrupt raised at an arbitrary point could fire inside a lock (rich's
    live display) or half-way through an optimizer step. A second Ctrl-C (a second or more later) interrupts at once; the last saved
    checkpoint is kept."""

    def __init__(self):
        self.requested: str | None = None  # the signal's name
        self._at = 0.0  # when it came
        self.handled_at = 0.0  # when this handler last ran (a rank stuck in a collective runs none: _Unanswered)
        self.beat_at = time.monotonic()  # when the loop last ended a step

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS} if _main_thread() else {}
        return self

    def beat(self) -> None:
        self.beat_at = time.monotonic()

    def _handle(self, signum, _frame):
        self.handled_at = time.monotonic()
        # A second Ctrl-C is a person's, a second or more later; one within a second is the first's echo: under
        # torchrun the terminal's SIGINT reaches each rank and torchrun forwards it again (the ranks then died
        # without a checkpoint, 5 tries in 6)
        if signum == signal.SIGINT and self.requested == "SIGINT" and time.monotonic() - self._at > SECOND_CTRL_C_AFTER:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested, self._at = signal.Signals(signum).name, time.monotonic()

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


NOTE_AFTER = 10.0  # seconds a stop may wait for a step before the waiting rank says why
HANDLER_WAIT = 3.0  # seconds a second signal may wait for Python's handler before the rank ends without it


class _Unanswered:
    """A stop under torchrun that a process which does not answer (stopped with Ctrl-Z or SIGSTOP, stuck on a file
    system) would hold for 30 minutes: the other ranks wait for it inside a collective, in C++, where Python's
    signal handlers (:class:`_Stop`) cannot run until gloo's timeout. Each signal's number still reaches this thread
    at once (``signal.set_wakeup_fd``). A stop that waits ``NOTE_AFTER`` s for a step says so, once; a second signal
    (a second or more after the first, as for Ctrl-C) that the handler has not taken ``HANDLER_WAIT`` s later ends
    the rank at once (``os._exit``: as after a kill, its files are whole, written atomically, and its last
    checkpoint is kept; a run without one yet leaves no files), with one line."""

    def __init__(self, stop: _Stop, rank: int, kept: Callable[[], str], on_exit: Callable[[], object]):
        self.stop, self.rank, self.kept, self.on_exit = stop, rank, kept, on_exit

    def __enter__(self):
        self._pipe = os.pipe() if _main_thread() else None
        if self._pipe:
            os.set_blocking(self._pipe[1], False)  # the C handler must never block on a full pipe
            self._old = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
            self._thread = threading.Thread(target=self._watch, name="bdm-unanswered", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._pipe:
            signal.set_wakeup_fd(self._old)
            os.close(self._pipe[1])  # the watcher reads the end of the pipe and returns
            self._thread.join(5)
            os.close(self._pipe[0])

    def _watch(self) -> None:
        import select

        stops = {s.value for s in STOP_SIGNALS}
        first, told = None, False  # when the first stop signal came; whether the note was printed
        while True:
            if select.select([self._pipe[0]], [], [], 0.5)[0]:
                came = os.read(self._pipe[0], 64)
                if not came:
                    return
                for signum in (s for s in came if s in stops):
                    now = time.monotonic()
                    if first is None:
                        first = now
                    elif now - first > SECOND_CTRL_C_AFTER:  # a second signal: taken at once if the handler can
                        time.sleep(HANDLER_WAIT)
                        if self.stop.handled_at < now:
                            self._say(f"Error: stopped by a second {signal.Signals(signum).name} inside a step, waiting "
                                      f"for another process of this run that does not answer; {self.kept()}")
                            with contextlib.suppress(Exception):  # the exit below must happen
                                self.on_exit()
                            os._exit(128 + signum)
            if first is not None and not told and time.monotonic() - max(first, self.stop.beat_at) > NOTE_AFTER:
                told = True
                self._say(f"Stopping: rank {self.rank} waits for the step all processes of this run take together (one "
                          "that does not answer, stopped with Ctrl-Z, stuck on a file system or gone, holds the others "
                          f"there); the same signal again stops this one at once; {self.kept()}")

    @staticmethod
    def _say(line: str) -> None:
        try:  # to the descriptor: the main thread may hold the console's lock (rich's live display)
            os.write(2, (line + "\n").encode("utf-8", "replace"))
        except OSError:  # no standard error
            pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@torch.no_grad()
def data_stats(data, max_images: int = 10_000, batch: int = 500) -> dict[str, torch.Tensor]:
    """Per-frequency statistics of ``DCT(x)`` over (up to ``max_images`` of) the data, float32: the Gaussian of the
    preconditioner (``mean_u`` [C, H, W]; each frequency's C x C colour covariance as eigenvectors ``basis_u``
    [C, C, H, W] and eigenvalues ``var_u`` [C, H, W], see engine.gaussian_eps) and the per-channel bounds ``min_u``,
    ``max_u`` [C, H, W] of the samplers' x prediction."""
    idx = torch.linspace(0, len(data) - 1, min(len(data), max_images)).long().tolist()
    n, s1, s2, low, high = 0, 0.0, 0.0, None, None
    for i in range(0, len(idx), batch):
        x = collate_valid([data[j] for j in idx[i : i + batch]])
        if len(x):
            u = dct2(x.double())
            n, s1, s2 = n + len(u), s1 + u.sum(0), s2 + torch.einsum("bchw,bdhw->hwcd", u, u)
            low = u.amin(0) if low is None else torch.minimum(low, u.amin(0))
            high = u.amax(0) if high is None else torch.maximum(high, u.amax(0))
    if n == 0:
        raise UserError("none of the dataset's images could be read")
    mean = s1 / n
    if float((s2 / n).diagonal(dim1=-2, dim2=-1).sum() - (mean**2).sum()) <= 1e-10 * mean.numel():
        raise UserError(f"the dataset's images are all the same ({n} read, no variance at any frequency): a diffusion "
                        "model needs images that differ")
    m = mean.permute(1, 2, 0)  # [H, W, C]
    var, basis = torch.linalg.eigh(s2 / n - m[..., :, None] * m[..., None, :])  # per frequency, ascending
    return {"mean_u": mean.float(), "var_u": var.permute(2, 0, 1).clamp(min=1e-8).float(),
            "basis_u": basis.permute(2, 3, 0, 1).contiguous().float(), "min_u": low.float(), "max_u": high.float()}


def preview_grid(ema, cfg: Config, device: torch.device, n: int, seed: int = 0, stats: dict | None = None) -> torch.Tensor:
    """An EMA sample grid with the engine's sampler at ``sample.preview_steps`` (same noise every time)."""
    g = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(n, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, generator=g, device=device)
    try:
        x = sample(denoiser(ema, cfg, stats), noise, cfg.diffusion, cfg.sample.preview_steps,
                   sampler=cfg.sample.sampler, grid=cfg.sample.grid or None, generator=g, denoised_range=denoised_range(stats))
    except NonFiniteOutput as e:
        raise UserError(f"the EMA weights' preview samples are not finite ({e}): the model is broken (its output "
                        "overflows); stopped, and the last checkpoint is kept") from None
    return make_grid(x.clamp(-1, 1).float().cpu())


def final_grid(ema, cfg: Config, device: torch.device, seed: int = 0, stats: dict | None = None) -> torch.Tensor:
    """``sample.n`` EMA samples at the full ``sample.steps`` of the preset's sampler."""
    full = replace(cfg, sample=replace(cfg.sample, preview_steps=cfg.sample.steps))
    return preview_grid(ema, full, device, cfg.sample.n, seed, stats)


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


RUN_FILES = {"checkpoint.pt", "config.yaml", "metrics.jsonl", "samples", "tb", ".lock"}
# What bdm train writes inside samples/ and tb/: anything else there is a user's
RUN_INNER = {"samples": re.compile(r"step_\d{6}\.png|final\.png"), "tb": re.compile(r"events\.out\.tfevents\..*")}


def empty_unstarted_run(run_dir: Path) -> bool:
    """Remove a run's files if it stopped before its first checkpoint (they hold nothing to resume, and would make the
    same command's next try a "run stopped before its first checkpoint"): whether the folder held only those."""
    import shutil

    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if not names <= RUN_FILES or CHECKPOINT in names:
        return False
    for p in run_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return True


def check_new_run_dir(run_dir: Path) -> None:
    """A new run goes into a new or empty directory, or one where a bdm run failed before its first logged step:
    never over a user's own files (their config.yaml, or a final.png in a samples/ folder), and never beside a
    killed run's metrics (the two runs' lines would mix in metrics.jsonl). bdm train checks it before it starts, and
    :func:`train` for a new run (a library caller's too)."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise UsageError(f"--out {run_dir} exists and is not a directory")
    if (blocker := blocking_file(run_dir)) is not None:
        raise UsageError(f"--out {run_dir}: {not_a_folder(blocker)}")
    if (run_dir / CHECKPOINT).exists():
        raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    ours = (run_dir / "config.yaml").is_file() and is_bdm_config(run_dir / "config.yaml")
    foreign = [p.name for p in run_dir.iterdir()
               if (p.name not in RUN_FILES and not p.name.endswith(TEMP_SUFFIX)) or p.is_symlink() or not ours]
    for sub, names in RUN_INNER.items():
        if (run_dir / sub).is_dir() and not (run_dir / sub).is_symlink():
            foreign += [f"{sub}/{p.name}" for p in (run_dir / sub).iterdir()
                        if p.is_symlink() or not (names.fullmatch(p.name) or p.name.endswith(TEMP_SUFFIX))]
    if foreign:
        raise UsageError(f"--out {run_dir} holds files that are not a bdm run's ({sorted(foreign)[0]!r}...); bdm train "
                         "writes config.yaml, metrics.jsonl and samples/ there: choose a new or empty directory")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        raise UsageError(f"--out {run_dir} holds a run stopped before its first checkpoint (its metrics.jsonl has no "
                         "checkpoint to continue from); a new run's metrics would mix with its: remove it or choose "
                         "another --out")


def is_bdm_config(path: Path) -> bool:
    """Whether ``path`` is a config.yaml that bdm wrote (a stopped run's), not a user's own file of that name: bdm
    writes every section and every key; a user's preset holds only differences."""
    import yaml

    from .config import ConfigError, from_dict, load_yaml

    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
        from_dict(data)
    except (ConfigError, OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError, TypeError, ValueError, AttributeError):
        return False
    full = to_dict(Config())
    return (set(data) == set(full)
            and all(isinstance(data[k], dict) and set(data[k]) == set(v) for k, v in full.items() if isinstance(v, dict)))


def train(cfg: Config, run_dir: Path, *, resume: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` (``checkpoint.pt``, ``config.yaml``, ``metrics.jsonl``, ``samples/``).

    ``progress`` is called on rank 0 after every step with ``{step, steps, loss, images_per_s}``.
    Returns ``{step, loss, interrupted, device, world, model, ema}`` (the last two: the trained modules).
    """
    if not isinstance(run_dir, (str, os.PathLike)):  # None or 5 failed inside pathlib
        raise TypeError(f"run_dir must be a path (str or os.PathLike), got {type(run_dir).__name__}")
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a bdm_cli.config.Config (load_config), got {type(cfg).__name__}")
    # a Config made with dataclasses.replace has not been through load_config's checks (batch_size 0, steps -3 and
    # ema_decay 1.5 trained, or failed deep in torch): the same types, ranges and cross-field rules as a saved config's
    cfg = from_dict(to_dict(cfg))
    run_dir = Path(run_dir)
    ddp = init_distributed(cfg.train.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, closed however the run ends
            return _train(cfg, run_dir, ddp, resume, progress, held)
    except RuntimeError as e:
        if ddp.distributed and peer_lost(e):  # the other rank's own error or stop is its message; this one's is this
            why = ("did not answer in time (stopped with Ctrl-Z or SIGSTOP, or stuck)" if re.search(r"timed out", str(e), re.I)
                   else "stopped or failed (its own message says why)")  # gloo's timeout, 30 minutes by default
            raise UserError(f"another process of this run {why}, so this one stops too; {_what_is_kept(run_dir)} "
                            f"(torch: {_first_line(e)})") from None
        raise
    finally:
        if ddp.owns_group:  # ended here, once the loop's DistributedDataParallel (which holds the group) is gone: a group
            gc.collect()  # left to the exit aborted a finished rank 1 run in 10 (gloo's threads; SIGABRT, and torchrun
            dist.destroy_process_group()  # then killed the others and reported a failure)


def peer_lost(e: BaseException) -> bool:
    """Whether ``e`` is a collective's failure: a rank that stopped (its error, a signal sent to it alone, a kill)
    leaves the others' next collective failing. torch raises gloo's as a plain RuntimeError. Not this rank's own
    lack of memory (NCCL's buffers), which the CLI explains as such."""
    text = str(e)
    if re.search(r"out of memory", text, re.I):
        return False
    return isinstance(e, dist.DistError) or bool(re.search(r"gloo|nccl|closed by peer|reset by peer", text, re.I))


def _what_is_kept(run_dir: Path) -> str:
    if (Path(run_dir) / CHECKPOINT).is_file():
        return f"its last checkpoint is kept (bdm train --resume {run_dir})"
    return "no checkpoint was written yet"


def _first_line(e: BaseException) -> str:
    """The first sentence of torch's message, without gloo's source location ("[.../pair.cc:561] Connection closed")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())
    return re.split(r"\.\s|\n", text)[0][:300] if text else type(e).__name__


def _train(cfg: Config, run_dir: Path, ddp: Dist, resume: bool, progress: Callable[[dict], None] | None,
           held: contextlib.ExitStack) -> dict:
    """The training loop of :func:`train`, in the process group ``ddp``; what it holds open until then, in ``held``."""
    tc = cfg.train
    device = resolve_device(tc.device, ddp.local_rank)
    cuda, run_dir = device.type == "cuda", Path(run_dir)
    if tc.batch_size % ddp.world:
        raise UserError(f"train.batch_size {tc.batch_size} must be divisible by the {ddp.world} processes")
    if ddp.main and not resume:  # a library caller's too: a new run never replaces a checkpoint or joins a user's files
        check_new_run_dir(run_dir)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = build_model(cfg).to(device)
    if ddp.rank == 0 and (unused := sorted(set(cfg.model.attn_resolutions) - set(model.resolutions))):
        # a warning, not an error: a preset's attention at 16 px stays valid under --set data.resolution=28
        warnings.warn(f"model.attn_resolutions {', '.join(map(str, unused))}: no level of this UNet has that size "
                      f"({', '.join(map(str, model.resolutions))} px), so it adds no attention there", stacklevel=1)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = make_optimizer(model, tc)
    torch.manual_seed(seed_of("dropout", tc.seed, ddp.rank))  # dropout differs per rank
    gen = torch.Generator(device).manual_seed(seed_of("train", tc.seed, ddp.rank))  # t, noise and flips
    step = 0
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT)
        check_resumable(state, run_dir / CHECKPOINT, [p for group in opt.param_groups for p in group["params"]])
        check_data_stats(state.get("data_stats"), cfg, run_dir / CHECKPOINT)
        load_weights(model, state["model"], "model", "resume")
        load_weights(ema, state.get("ema", state["model"]), "ema" if "ema" in state else "model", "resume")
        step, rng = int(state["step"]), state["rng"]
        try:
            # the moments are the run's; the settings (weight decay, betas, eps, fused) are this config's: a resume
            # with --set train.weight_decay trained on the old value, and an edited amsgrad or maximize with it
            settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            opt.load_state_dict(state["opt"])
            for group, own in zip(opt.param_groups, settings):
                group.update(own)
            if len(rng["gen"]) == len(rng["torch"]) == ddp.world:
                gen.set_state(rng["gen"][ddp.rank]), torch.set_rng_state(rng["torch"][ddp.rank])
            elif ddp.main:  # each process's streams were saved: with another count they cannot go on
                warnings.warn(f"the run was trained by {len(rng['gen'])} process(es) and resumes with {ddp.world}: its data "
                              "order and noise go on from new generators (not the steps the old count would take)")
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{run_dir / CHECKPOINT} cannot be resumed: its optimizer or generator state does not fit "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if cuda:
        model, ema = model.to(memory_format=torch.channels_last), ema.to(memory_format=torch.channels_last)
    if ddp.distributed:  # a performance note of DDP's (some gradients' layout differs from its buckets), every run
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if ddp.distributed else model

    # CUDA graphs on one process; DDP's gradient all-reduce runs between the graphs' kernels, so there plain compile
    network = bf16_network(compiled(net, tc.compile, device, cuda_graphs=not ddp.distributed), device, tc.bf16)
    schedule = cfg.diffusion
    data = make_dataset(cfg.data.dataset, cfg.data.resolution, cfg.data.channels, cfg.data.split)
    fingerprint = dataset_fingerprint(data)
    if resume and ddp.main and state.get("data") not in (None, fingerprint):
        warnings.warn(f"the dataset changed since the run started ({state['data']}, now {fingerprint}): training goes "
                      "on with it, but its data order is not the run's, and its statistics are the first images'")
    stats = (state.get("data_stats") if resume else None) or data_stats(data)
    stats = {k: v.to(device) for k, v in stats.items()} if stats else None
    eps_model = denoiser(network, cfg, stats)
    batches = StepBatches(len(data), tc.batch_size, tc.seed, step, tc.steps, ddp.rank, ddp.world)
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.data.num_workers, pin_memory=cuda,
                                         collate_fn=collate_valid, generator=torch.Generator())  # keeps the global RNG untouched
    if ddp.main:
        for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl", "samples", "tb", ".lock"):
            if (run_dir / name).is_symlink():  # appending metrics or writing grids would go through it, elsewhere
                raise UserError(f"{run_dir / name} is a symbolic link; a run directory holds only its own files")
            if name in ("samples", "tb") and (run_dir / name).exists() and not (run_dir / name).is_dir():
                raise UserError(f"{run_dir / name} is not a folder (bdm train writes its {name} there): move it away")
            if name in ("config.yaml", "metrics.jsonl") and (run_dir / name).exists() and not (run_dir / name).is_file():
                raise UserError(f"{run_dir / name} is not a file (bdm train writes its {name} there): move it away")
        held.enter_context(_lock(run_dir))
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, run_dir / "samples"):  # what a killed (kill -9) writer left behind
            remove_stale_temps(folder)
        write_config(run_dir, cfg)
        if resume:
            _trim_metrics(run_dir / "metrics.jsonl", step)
    writer = _tensorboard(run_dir) if ddp.main else None

    def gathered(state: torch.Tensor) -> list[torch.Tensor]:
        if ddp.world == 1:
            return [state]
        local = state.to(device)
        out = [torch.empty_like(local) for _ in range(ddp.world)]
        dist.all_gather(out, local)
        return [o.cpu() for o in out]

    saved_at = step if resume else None  # the step of the run's last checkpoint (a stop's message names it)

    def kept() -> str:
        if saved_at is None:
            return "no checkpoint was written yet (nothing to resume)"
        return f"the checkpoint of step {saved_at} is kept"

    def checkpoint() -> None:
        nonlocal saved_at
        rng = {"gen": gathered(gen.get_state()), "torch": gathered(torch.get_rng_state())}
        if ddp.main:
            save_checkpoint(run_dir / CHECKPOINT, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                                   "step": step, "config": to_dict(cfg), "rng": rng, "data": fingerprint,
                                                   "data_stats": {k: v.cpu() for k, v in stats.items()} if stats else {}})
        saved_at = step

    # Per-step scalars stay on the device and are read only at log and checkpoint steps: a GPU then never waits
    # for the host between steps (no .item() in the steady state).
    zero = lambda: torch.zeros((), device=device)  # noqa: E731
    loss_sum, loss_n, first_skipped = zero(), zero(), torch.full((), -1, device=device)
    skipped = torch.zeros(2, device=device)  # steps not applied since the last read: [non-finite, a rank's share unread]
    last_loss, stopped_by, skipped_batches = math.nan, None, 0
    unread_here, skipped_images = 0, 0  # images that could not be decoded since the start: this rank's; all ranks' (read at settle)
    tick, tick_step, start_step = time.perf_counter(), step, step

    def settle() -> None:
        """Read the device's counters (one sync); a non-finite step stops training unless skipping was asked for, and
        so does a dataset of which most images could not be read (changed or damaged since the run started)."""
        nonlocal skipped_batches, skipped_images
        read = torch.tensor([float(unread_here), float(step - start_step) * tc.batch_size], device=device)
        if ddp.distributed:  # (``skipped`` is the same on every rank: train_step agrees on it)
            dist.all_reduce(read)
            read[1] /= ddp.world  # each rank counted the global batch, and its own unread images
        unread, tried = read.tolist()
        skipped_images = int(unread)
        if tried >= 4 * tc.batch_size and unread > tried / 2:
            raise AgreedError(f"{unread:.0f} of the {tried:.0f} images read since step {start_step} could not be decoded "
                            f"(the dataset changed or is damaged; see the warnings); stopped, {kept()}")
        (nonfinite_steps, unread_steps), first = (int(v) for v in skipped.tolist()), int(first_skipped.item())
        skipped_batches += nonfinite_steps + unread_steps
        skipped.zero_()
        if nonfinite_steps and not tc.skip_nonfinite:
            raise AgreedError(f"the loss is not finite at step {first + 1} (its update was not applied); stopped, {kept()} "
                            "(--set train.skip_nonfinite=true skips such batches)")

    def log_window() -> None:
        """Log the mean loss and images/s since the last log (one sync), on rank 0."""
        nonlocal last_loss, tick, tick_step, loss_sum, loss_n
        settle()
        if loss_n.item():
            last_loss = (loss_sum / loss_n).item()
        now = time.perf_counter()
        ips = (step - tick_step) * tc.batch_size / max(now - tick, 1e-9)
        tick, tick_step, loss_sum, loss_n = now, step, zero(), zero()
        if ddp.main:
            _log(run_dir, writer, {"step": step, "loss": last_loss, "lr": opt.param_groups[0]["lr"], "images_per_s": ips,
                                   "skipped_batches": skipped_batches, "skipped_images": skipped_images})
            if progress:
                progress({"step": step, "steps": tc.steps, "loss": last_loss, "images_per_s": ips})

    # A signal sent to one process of several (a targeted kill) stopped it alone, and the others' next collective failed
    # with a traceback and no checkpoint: every rank reads the stop requests of all over a CPU (gloo) group, every
    # STOP_EVERY steps (no GPU synchronisation), and all stop at the same step with one checkpoint
    control = (dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")) if ddp.distributed else None

    def agreed_stop(requested: str | None) -> str | None:
        if control is None:
            return requested
        if step % STOP_EVERY:
            return None
        signum = torch.tensor(signal.Signals[requested].value if requested else 0)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX, group=control)
        return signal.Signals(int(signum)).name if int(signum) else None

    raise_if_interrupted()  # a Ctrl-C lost during start-up stops before the first step, as it was meant to
    def unstarted() -> None:  # what the CLI does for a run stopped before its first checkpoint, where it cannot
        if ddp.main and saved_at is None:
            empty_unstarted_run(run_dir)

    with _Stop() as stop, (_Unanswered(stop, ddp.rank, kept, unstarted) if ddp.distributed else contextlib.nullcontext()):
        for x in loader:
            unread_here += tc.batch_size // ddp.world - len(x)  # undecodable files (warned by the dataset)
            unread = len(x) == 0  # no image of this rank's share could be read: a stand-in of its shape takes the
            if unread:  # step's collectives with the other ranks, and no rank applies the step (counted, not retried)
                x = torch.zeros(tc.batch_size // ddp.world, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
            x = x.to(device, non_blocking=True)
            b = x.shape[0]
            if cfg.data.hflip:
                x = torch.where(torch.rand(b, 1, 1, 1, generator=gen, device=device) < 0.5, x.flip(-1), x)
            t = torch.rand(b, generator=gen, device=device)
            noise = torch.randn(x.shape, generator=gen, device=device)
            if cuda:
                x, noise = x.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
            loss, skip = train_step(eps_model, model, ema, opt, x, t, noise, schedule, lr=lr_at(step, tc.lr, tc.warmup),
                                    grad_clip=tc.grad_clip, ema_decay=tc.ema_decay, distributed=ddp.distributed, unread=unread)
            skipped += skip
            first_skipped = torch.where((first_skipped < 0) & (skip[0] > 0), step, first_skipped)
            applied = 1 - skip.amax()
            loss_sum, loss_n = loss_sum + torch.where(applied > 0, loss, 0.0), loss_n + applied
            step += 1
            if _every(step, tc.log_every) or step == tc.steps:
                log_window()
            elif ddp.main and progress:
                progress({"step": step, "steps": tc.steps})
            if _every(step, tc.sample_every) and ddp.main:
                save_image(preview_grid(ema, cfg, device, cfg.sample.n, stats=stats), run_dir / "samples" / f"step_{step:06d}.png")
            if _every(step, tc.checkpoint_every):
                settle()  # a non-finite step stops before its checkpoint is written
                checkpoint()
            if stopped_by := agreed_stop(stop.requested):
                break
            stop.beat()
        stop.beat()
        # still under _Stop: a signal now waits for the last checkpoint (a Ctrl-C here raised inside a rank's final
        # all_gather, and a new run without an earlier checkpoint lost its folder)
        if step > tick_step:  # stopped between log steps: its last steps are logged too
            log_window()
        settle()
        checkpoint()
    if writer:
        writer.close()
    if ddp.main and stopped_by is None and step >= tc.steps and tc.steps > 0:
        save_image(final_grid(ema, cfg, device, stats=stats), run_dir / "samples" / "final.png")
    return {"step": step, "loss": last_loss, "interrupted": stopped_by is not None, "stopped_by": stopped_by,
            "skipped_batches": skipped_batches, "skipped_images": skipped_images, "device": str(device), "world": ddp.world,
            "model": model, "ema": ema}


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics logged after the checkpoint a resume starts from (a run killed between its last checkpoint
    and its next log line): the resumed run logs those steps again, so each step appears once. A last line cut
    short (a kill or a full disk inside a write) is dropped too, or ended if it is whole: the next record would
    be glued onto it. The file is streamed (memory: one line; a long run's file is large) and rewritten only if a
    line changes."""
    if not path.is_file():
        return

    def logged_at(line: bytes) -> float | None:
        """The step of one of bdm's records, None for any other line (a user's note, a NaN step)."""
        if len(line) > 1 << 16 or not line.startswith(b"{"):  # bdm's records: a few hundred bytes, a JSON object
            return None
        try:
            value = float(json.loads(line)["step"])
        except (ValueError, KeyError, IndexError, TypeError):  # UnicodeDecodeError is a ValueError
            return None
        return value if math.isfinite(value) else None

    def split(lines: Iterable[bytes]) -> Iterator[bytes]:
        """Lines ended by LF, CRLF or a lone CR (a file hand-edited on an old Mac: its records are records too),
        each with its own ending."""
        for line in lines:
            yield from (piece for piece in _AFTER_LONE_CR.split(line) if piece)

    def kept(lines: Iterable[bytes]) -> Iterator[bytes]:  # bytes: the lines kept are kept exactly as written
        last = None
        for line in split(lines):
            if (logged_at(line) or 0.0) <= step:  # not a metrics line of ours: kept
                if last is not None:
                    yield last
                last = line
        if last is not None and not last.endswith((b"\n", b"\r")):  # ours cut short (its opening as _log writes it)
            # is dropped, and so is a tail of NULs (a crash's unwritten blocks)
            opening = b'{"step": '  # cut anywhere, even inside it
            cut = (opening.startswith(last) or (last.startswith(opening) and last.count(opening) == 1)) and logged_at(last) is None
            last = b"" if cut or not last.strip(b"\x00") else last + b"\n"
        if last:
            yield last

    with open(path, "rb") as f:  # only a file's last line can lack its ending
        changed = any((logged_at(line) or 0.0) > step or not line.endswith((b"\n", b"\r")) for line in split(f))
    if changed:
        with open(path, "rb") as f, atomic_write(path, "wb") as out:
            out.writelines(kept(f))


_AFTER_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # where a line that ends in CR alone ends


def _lock(run_dir: Path):
    """An exclusive lock on the run directory for the whole training: a second ``bdm train`` into it (by mistake,
    or a scheduler's duplicate) stops at once instead of mixing its checkpoints and metrics with the first's."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    if path.is_symlink() or (path.exists() and not path.is_file()):  # a pipe would block the open, a link lead elsewhere
        raise UserError(f"{path} is not a regular file (a link, pipe or folder); remove it: bdm train makes its own")
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunLocked(f"another bdm train is writing into {run_dir} (it holds {run_dir / '.lock'}); wait for it to end, "
                        "or train into another folder") from None
    return f


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _log(run_dir: Path, writer, record: dict) -> None:
    with naming(run_dir / "metrics.jsonl"), open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**record, "time": time.time()}) + "\n")
    if writer:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, record["step"])

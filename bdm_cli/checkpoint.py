"""Run directories and checkpoints: plain tensors and dicts (``torch.load(weights_only=True)``), written atomically."""

from __future__ import annotations

import errno
import math
import numbers
import pickle
import reprlib
import zipfile
from pathlib import Path

import torch
import yaml

from .config import Config, ConfigError, from_dict, to_dict
from .errors import UserError
from .io import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "check_resumable", "check_data_stats", "write_config",
           "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


class CheckpointError(UserError):
    """A missing, truncated, foreign or unsafe checkpoint."""


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, dicts, lists) to ``path`` via temp file + fsync + rename."""
    try:
        with atomic_write(path) as f:
            torch.save({"format": FORMAT, **state}, f)
    except (RuntimeError, OSError) as e:  # torch's zip writer reports a failed write as a RuntimeError, without its errno
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        kept = "the previous checkpoint is kept" if Path(path).is_file() else "no checkpoint was written"
        raise CheckpointError(f"could not write the checkpoint {path} ({_write_failure(e)}); {kept}") from None
    return Path(path)


def _write_failure(e: Exception) -> str:
    """Why a write failed: its errno, or, where torch's writer lost it, the likely causes."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    over = f"over this process's file-size limit of {limit} bytes (ulimit -f)"
    if isinstance(e, OSError):
        return {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}.get(e.errno, over)
    return "the disk is full" + ("" if limit == resource.RLIM_INFINITY else f", or the file is {over}")


def load_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint safely (no code runs) and check it is one of ours."""
    path = Path(path)
    if path.is_dir() and path.name != CHECKPOINT:
        if not (path / CHECKPOINT).exists():
            raise CheckpointError(f"{path} holds no {CHECKPOINT}: not a bdm run folder, or one that saved no checkpoint yet")
        path = path / CHECKPOINT
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint file (a directory, pipe or device)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data (code could run on loading); refusing to load it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, TypeError, AttributeError, LookupError,
            OverflowError, RecursionError) as e:  # a hand-made pickle reaches torch's loader with records of any type
        text = str(e).splitlines()[0][:300] if str(e) else ""
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt? {type(e).__name__}: {text})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a bdm checkpoint (no model/config entries)")
    if not isinstance(state.get("format", FORMAT), int) or isinstance(state.get("format"), bool) or state.get("format", FORMAT) < 1:
        raise CheckpointError(f"{path} is not a valid bdm checkpoint: 'format' is not a version number "
                              f"({reprlib.repr(state.get('format'))})")
    if state.get("format", FORMAT) > FORMAT:
        raise CheckpointError(f"{path} was written by a newer bdm (checkpoint format {state.get('format')!r}, this one reads "
                              f"up to {FORMAT}): update bdm")
    _check_contents(state, path)
    return state


def _tensors(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided
                                           for k, v in value.items())


def _count(value) -> bool:
    """A step count: a non-negative 64-bit int, or a 0-d integer tensor holding one."""
    if isinstance(value, torch.Tensor):
        return (value.ndim == 0 and not value.is_floating_point() and not value.is_complex()
                and value.dtype != torch.bool and not value.is_meta and int(value) >= 0)
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _check_contents(state: dict, path: Path) -> None:
    """The types inside a checkpoint, checked once where it enters: a foreign or hand-edited file gets one clear
    message instead of a traceback somewhere later."""
    bad = None
    step = state.get("step", 0)
    if not isinstance(state["config"], dict):
        bad = "'config' is not a mapping"
    elif not _tensors(state["model"]) or ("ema" in state and not _tensors(state["ema"])):
        bad = "'model'/'ema' are not mappings of names to tensors"
    elif not _count(step):
        bad = f"'step' is not a count of steps ({reprlib.repr(step)})"
    elif "data_stats" in state and not _tensors(state["data_stats"]):
        bad = "'data_stats' is not a mapping of names to tensors"
    elif "opt" in state and not isinstance(state["opt"], dict):
        bad = "'opt' is not an optimizer state"
    elif "data" in state and not isinstance(state["data"], str):
        bad = "'data' is not a dataset's description"
    if bad:
        raise CheckpointError(f"{path} is not a valid bdm checkpoint: {bad}")


ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # AdamW's per-parameter state (torch's _init_group needs all three)


def check_resumable(state: dict, path: Path, params: list[torch.Tensor]) -> None:
    """What ``--resume`` needs beyond the weights: the random number generators' states and an optimizer state that
    fits ``params`` (the optimizer's parameters, in its order): per parameter, tensors of its shape and dtype (torch
    crashed on other shapes inside its fused kernel, and trained on with integer moments), a finite ``step`` >= 0
    and second moments >= 0 (a negative one made the loss NaN, blamed on the data)."""
    rng = state.get("rng")
    ok = isinstance(state.get("opt"), dict) and isinstance(rng, dict) and all(
        isinstance(rng.get(k), list) and rng[k] and all(isinstance(g, torch.Tensor) and g.dtype == torch.uint8 for g in rng[k])
        for k in ("gen", "torch"))
    if not ok:
        held = "a damaged" if isinstance(state.get("opt"), dict) and isinstance(rng, dict) else "no"
        raise CheckpointError(f"{path} cannot be resumed: it holds {held} optimizer or random-generator state (a weights-only, "
                              "damaged or foreign checkpoint; start a new run and load nothing, or sample from it)")
    per_param = state["opt"].get("state")
    if not isinstance(per_param, dict) or not set(per_param) <= set(range(len(params))):
        raise CheckpointError(f"{path} cannot be resumed: its optimizer state is damaged or for another model")
    step = state.get("step")
    if isinstance(step, int) and step > 0 and len(per_param) < len(params):  # every parameter has moments after a step:
        # without them Adam starts over at full lr, with no warm-up, and --resume no longer continues the run
        raise CheckpointError(f"{path} cannot be resumed: its optimizer state holds moments for {len(per_param)} of the "
                              f"{len(params)} parameters after {step} steps (damaged)")
    for i, moments in per_param.items():
        if not isinstance(moments, dict) or not ADAM_STATE <= set(moments) or not all(
                _fits(k, v, params[i]) for k, v in moments.items()):
            raise CheckpointError(f"{path} cannot be resumed: its optimizer state is damaged (parameter {i}: step, "
                                  "exp_avg and exp_avg_sq, the moments finite tensors of the parameter's shape and dtype, "
                                  "the second >= 0, step >= 0)")


def _fits(name: str, value, param: torch.Tensor) -> bool:
    """One entry of a parameter's Adam state: ``step`` a number or scalar tensor, the moments like the parameter."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return name == "step" and math.isfinite(value) and value >= 0
    if not isinstance(value, torch.Tensor) or value.is_meta or not value.dtype.is_floating_point:
        return False
    if name == "step":
        return value.numel() == 1 and bool(torch.isfinite(value).all() and (value >= 0).all())
    return (value.shape == param.shape and value.dtype == param.dtype and bool(torch.isfinite(value).all())
            and (name != "exp_avg_sq" or bool((value >= 0).all())))


def check_data_stats(stats: dict | None, cfg: Config, path: Path) -> None:
    """The stored per-frequency data statistics fit the model's images: each [channels, resolution, resolution], finite."""
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    stats = stats or {}
    for key, value in stats.items():
        if key in ("mean_u", "var_u", "min_u", "max_u") and (
                tuple(value.shape) != shape or value.is_meta
                or value.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                or not torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: data_stats.{key} must be finite floats of shape {list(shape)}, got "
                                  f"{value.dtype} {list(value.shape)}")
    if stats and not {"mean_u", "var_u"} <= stats.keys():
        raise CheckpointError(f"{path}: data_stats has no mean_u/var_u (the preconditioner's Gaussian)")
    if ("min_u" in stats) != ("max_u" in stats):
        raise CheckpointError(f"{path}: data_stats holds only one of min_u and max_u")
    if "var_u" in stats and not (stats["var_u"] > 0).all():
        raise CheckpointError(f"{path}: data_stats.var_u must be positive")
    # Pixels lie in [-1, 1], so an orthonormal DCT coefficient within +-sqrt(H W) (Cauchy-Schwarz) and a colour
    # covariance's eigenvalue within C H W (its trace): beyond them the statistics are not of images
    reach, c = math.sqrt(shape[1] * shape[2]), shape[0]
    for key in ("mean_u", "min_u", "max_u", "var_u"):
        limit = c * reach**2 if key == "var_u" else reach
        if key in stats and stats[key].double().abs().max() > limit * (1 + 1e-3):
            raise CheckpointError(f"{path}: data_stats.{key} reaches {stats[key].double().abs().max():.3g}, beyond the "
                                  f"{limit:.3g} that images in [-1, 1] of size {shape[1]}x{shape[2]} can give")
    if "min_u" in stats and not (stats["min_u"] <= stats["max_u"]).all():
        raise CheckpointError(f"{path}: data_stats.min_u exceeds max_u")
    if "min_u" in stats:  # a mean over the data lies within its range (float32 round-off aside)
        slack = 1e-4 * (1 + stats["max_u"].double().abs().max())
        if not ((stats["mean_u"] >= stats["min_u"] - slack) & (stats["mean_u"] <= stats["max_u"] + slack)).all():
            raise CheckpointError(f"{path}: data_stats.mean_u lies outside [min_u, max_u]")
    if "var_u" in stats and stats["var_u"].double().sum() <= 1e-10 * stats["var_u"].numel():  # as train.data_stats
        raise CheckpointError(f"{path}: data_stats.var_u is all but zero: the statistics of identical images, which "
                              "training refuses")
    if "min_u" in stats:  # Popoviciu: a variance is at most (max - min)^2 / 4 per channel; the eigenvalues sum to the
        # trace (train.data_stats stores the same images' population moments, eigenvalues floored at 1e-8 each)
        total = stats["var_u"].double().sum(0)
        bound = ((stats["max_u"].double() - stats["min_u"].double()) ** 2 / 4).sum(0) * (1 + 1e-3) + c * 1.01e-8
        if (total > bound).any():
            raise CheckpointError(f"{path}: data_stats.var_u exceeds what the range min_u..max_u allows (a variance is at "
                                  "most a quarter of the squared range): the statistics are not of one dataset")
    if "basis_u" in stats:  # optional (checkpoints before it: independent channels); orthonormal columns per frequency
        b = stats["basis_u"]
        c = shape[0]
        if (tuple(b.shape) != (c, *shape) or b.is_meta or not b.is_floating_point() or not torch.isfinite(b).all()
                or (torch.einsum("ckhw,cjhw->hwkj", b.double(), b.double()) - torch.eye(c, dtype=torch.float64)).abs().max() > 1e-3):
            raise CheckpointError(f"{path}: data_stats.basis_u must be {c} orthonormal columns per frequency, of shape "
                                  f"{[c, *shape]}")


def checkpoint_config(state: dict, path: Path | str = "the checkpoint") -> Config:
    """The config a checkpoint was trained with; a damaged one is the checkpoint's fault (exit 1), not a usage error."""
    try:
        return from_dict(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config is damaged ({e})") from None


def write_config(run_dir: Path, cfg: Config) -> Path:
    path = Path(run_dir) / "config.yaml"
    with atomic_write(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return path

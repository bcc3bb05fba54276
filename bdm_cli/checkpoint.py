"""Run directories and checkpoints: plain tensors and dicts (``torch.load(weights_only=True)``), written atomically."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import yaml

from .config import Config, from_dict, to_dict
from .errors import UserError
from .io import atomic_write

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "write_config", "CHECKPOINT"]

CHECKPOINT = "checkpoint.pt"
FORMAT = 1


class CheckpointError(UserError):
    """A missing, truncated, foreign or unsafe checkpoint."""


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write ``state`` (tensors, numbers, strings, dicts, lists) to ``path`` via temp file + fsync + rename."""
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, **state}, f)
    return Path(path)


def load_checkpoint(path: Path | str, map_location="cpu") -> dict:
    """Load a checkpoint safely (no code runs) and check it is one of ours."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data (code could run on loading); refusing to load it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt? {type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a bdm checkpoint (no model/config entries)")
    return state


def checkpoint_config(state: dict) -> Config:
    return from_dict(state["config"])


def write_config(run_dir: Path, cfg: Config) -> Path:
    path = Path(run_dir) / "config.yaml"
    with atomic_write(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    return path

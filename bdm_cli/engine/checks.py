"""What the engine's documented functions check on entry, so that a wrong argument raises one clear error instead of
a NaN, a broadcast into plausible numbers, or an error from deep inside torch."""

from __future__ import annotations

import numbers

import torch

__all__ = ["check_whole", "check_times", "check_images"]


def check_whole(value, name: str, low: int = 1, high: int | None = None) -> None:
    """A whole number (any integral type, never a bool) in ``[low, high]``: ``steps``, ``n``, image sizes."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (high is not None and value > high):
        where = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be a whole number {where}, got {value!r}")


def check_times(t, name: str = "t") -> None:
    """Times must lie in [0, 1] (the cosine schedule's tan is periodic: t = 3 gave plausible numbers, 1.5 NaN).
    Checked for Python numbers and CPU tensors; on a GPU the check would stall every training step on a host
    synchronisation, so there the caller's t (``torch.rand``, a time grid) is trusted."""
    if isinstance(t, torch.Tensor):
        if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            bad = t[~((t >= 0) & (t <= 1))].flatten()[0].item()
            raise ValueError(f"{name} must be in [0, 1], got {bad}")
    elif isinstance(t, numbers.Real) and not isinstance(t, bool):
        if not 0 <= t <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {t}")
    else:
        raise TypeError(f"{name} must be a tensor or a number in [0, 1], got {type(t).__name__}")


def check_images(x, name: str = "x", batch=None) -> None:
    """A floating-point tensor of images [B, C, H, W] with no empty dim (a [C, H, W] image broadcast against t's
    batch into B images; a numpy array failed inside torch); with ``batch``, the times given for them: one, or
    one per image (t of another length broadcast one image into several)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.ndim != 4 or 0 in x.shape:
        raise ValueError(f"{name} must be [B, C, H, W] with no empty dim, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if batch is not None and (n := torch.as_tensor(batch).numel()) not in (1, x.shape[0]):
        raise ValueError(f"{name} holds {x.shape[0]} images but {n} times were given (one, or one per image)")

"""What the engine's documented functions check on entry, so that a wrong argument raises one clear error instead of
a NaN, a broadcast into plausible numbers, or an error from deep inside torch."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["check_whole", "check_times", "check_images", "check_like", "check_schedule", "check_model_output", "check_bounds", "check_generator"]


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
        if t.is_complex() or t.dtype == torch.bool or t.is_meta:  # no order (complex), no values (meta)
            raise TypeError(f"{name} must be a real tensor with values, got {'a meta' if t.is_meta else t.dtype} tensor")
        if t.device.type == "cpu" and t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            bad = t[~((t >= 0) & (t <= 1))].flatten()[0].item()
            raise ValueError(f"{name} must be in [0, 1], got {bad}")
    elif isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool):
        try:  # what torch converts: not np.longdouble or np.uint64
            torch.as_tensor(t)
        except (TypeError, RuntimeError):
            raise TypeError(f"{name} must be a tensor or a number in [0, 1], got a {type(t).__name__}, which torch "
                            "cannot convert (use a float)") from None
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
    if x.is_meta:
        raise TypeError(f"{name} is a meta tensor (a shape without values)")
    if x.layout != torch.strided:  # the DCT's matrix products and expand do not take sparse tensors
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout} (use .to_dense())")
    if x.ndim != 4 or 0 in x.shape:
        raise ValueError(f"{name} must be [B, C, H, W] with no empty dim, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if batch is not None and (n := torch.as_tensor(batch).numel()) not in (1, x.shape[0]):
        raise ValueError(f"{name} holds {x.shape[0]} images but {n} times were given (one, or one per image)")
    if batch is not None and torch.as_tensor(batch).ndim > 1:  # [2, 2] times for 4 images: which time is whose?
        raise ValueError(f"the times for {name} must be a number or a 1-D tensor [B], got shape "
                         f"{tuple(torch.as_tensor(batch).shape)}")


def check_like(y, x: torch.Tensor, name: str, other: str) -> None:
    """``y`` (noise, eps) for the images ``x``: a floating-point tensor of x's shape on x's device (complex or
    boolean noise made complex or integer z_t; meta or another device failed inside torch)."""
    check_images(y, name)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"{name} must have {other}'s shape {tuple(x.shape)} on {x.device}, got {tuple(y.shape)} on "
                         f"{y.device}")


def check_schedule(schedule) -> None:
    """A :class:`BlurSchedule` (None or a dict of its fields failed deep inside as an AttributeError)."""
    from .schedule import BlurSchedule  # here, not at the top: schedule.py may one day use these checks itself

    if not isinstance(schedule, BlurSchedule):
        raise TypeError(f"schedule must be a BlurSchedule, got {type(schedule).__name__}")


class NonFiniteOutput(ValueError):
    """The model returned NaN or inf for some sample at some step, or values so large that the x prediction made of
    them overflows: :func:`~bdm_cli.engine.sample` raises this instead of returning those samples (the per-frequency
    clamp made an infinite prediction a finite, plausible-looking image)."""


def check_model_output(eps, z: torch.Tensor) -> None:
    """What a model returned for the input ``z``: a real floating-point tensor of ``z``'s shape (a tuple or a numpy
    array failed inside torch; a [B, 1, H, W] output broadcast one eps over every channel; integers and complex were
    cast silently, complex losing its imaginary part). Reads no values: it runs inside every sampling step."""
    if not isinstance(eps, torch.Tensor):
        raise TypeError(f"the model returned a {type(eps).__name__}, not a torch.Tensor of its input's shape "
                        f"{tuple(z.shape)}")
    if eps.shape != z.shape:
        raise ValueError(f"the model returned shape {tuple(eps.shape)} for an input of shape {tuple(z.shape)}")
    if not eps.is_floating_point():  # False for complex too
        raise TypeError(f"the model returned a {eps.dtype} tensor, not a real floating-point one")
    if eps.device != z.device:
        raise ValueError(f"the model returned a tensor on {eps.device} for an input on {z.device}")


def check_bounds(bounds, shape, name: str = "denoised_range", dtype: torch.dtype = torch.float64) -> None:
    """A pair ``(low, high)`` of floating-point tensors of exactly ``shape``, finite, with ``low <= high`` everywhere:
    bounds of another shape broadcast 1-channel noise into 3-channel samples, a NaN bound made every sample NaN and
    ``low > high`` clamped silently to ``high``. Reads the values once per call (small [C, H, W] tensors)."""
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(isinstance(b, torch.Tensor) for b in bounds)):
        raise TypeError(f"{name} must be a pair of tensors (low_u, high_u), each {list(shape)} in DCT space, got "
                        f"{type(bounds).__name__}")
    for which, b in zip(("low_u", "high_u"), bounds):
        if b.is_meta:
            raise TypeError(f"{name}'s {which} is a meta tensor (a shape without values)")
        if not b.is_floating_point():
            raise TypeError(f"{name}'s {which} must be a floating-point tensor, got {b.dtype}")
        if b.shape != shape:
            raise ValueError(f"{name}'s {which} must have shape {list(shape)} (the images' [C, H, W]), got {list(b.shape)}")
    # finite in the dtype they are used in (the noise's): 1e300 is finite in float64 and inf in float32
    low, high = (b.detach().to("cpu", dtype).double() for b in bounds)
    if (bad := ~(low.isfinite() & high.isfinite() & (low <= high))).any():
        i = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite with low_u <= high_u everywhere, got low_u {low[tuple(i)].item()} and "
                         f"high_u {high[tuple(i)].item()} at {i}")


def check_generator(generator, batch: int) -> None:
    """None, one ``torch.Generator``, or one per image of the batch (an int seed failed in ``len()``)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not (isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator)):
        raise TypeError(f"generator must be None, a torch.Generator or one per image, got {type(generator).__name__}")
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}")

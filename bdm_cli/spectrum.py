"""Samples against their data in pixels and per DCT frequency: the statistics that show a grey or noisy sampler.

FID alone hides *how* samples differ from the data. These numbers name it: a sampler that turns
black-and-white digits grey lowers the saturated fraction and the pixel std; one that adds
high-frequency noise raises the DCT std of the highest frequencies above the data's.
"""

from __future__ import annotations

import numbers

import torch

from .engine import BlurSchedule, dct2
from .engine.checks import check_images, check_whole

__all__ = ["SATURATED", "band_masks", "image_statistics", "compare"]

SATURATED = 0.9  # |x| above this counts as saturated (the digits' black background and white strokes)


def band_masks(height: int, width: int, fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [H, W] masks of the lowest and the highest ``fraction`` of the non-DC DCT frequencies, ordered by
    ``lambda = (pi k / H)^2 + (pi l / W)^2`` (the blur's own order: the lowest are blurred last)."""
    check_whole(height, "height")
    check_whole(width, "width")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be a number in (0, 0.5] (the low and high bands must not overlap), got {fraction!r}")
    if height * width < 3:  # a low and a high band of non-DC frequencies need two of them
        raise ValueError(f"band_masks needs images of at least 3 pixels, got {height} x {width}")
    lam = BlurSchedule.frequencies(height, width).flatten()
    order = lam.argsort(stable=True)[1:]  # DC (lambda 0) left out: it is the image mean, reported on its own
    count = max(1, round(fraction * order.numel()))
    low, high = torch.zeros(height * width, dtype=torch.bool), torch.zeros(height * width, dtype=torch.bool)
    low[order[:count]], high[order[-count:]] = True, True
    return low.view(height, width), high.view(height, width)


@torch.no_grad()
def image_statistics(x: torch.Tensor) -> dict:
    """Pixel and per-frequency statistics of images ``x`` [N, C, H, W] in [-1, 1] (float64 sums)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():  # uint8 0..255 in [-1, 1] is all saturated
        raise TypeError(f"image_statistics needs float images in [-1, 1], got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != 4 or x.shape[0] < 2:  # a variance over images needs two of them
        raise ValueError(f"image_statistics needs [N, C, H, W] with N >= 2 images, got shape {tuple(x.shape)}")
    check_images(x)
    if not bool(torch.isfinite(x).all()):  # NaN passes any range check (and counted as "not saturated")
        raise ValueError("image_statistics needs finite images: they hold NaN or inf")
    if x.min() >= 0 and x.max() > 2:  # 8-bit values as floats: every pixel would count as saturated
        raise ValueError(f"image_statistics needs images in [-1, 1], got values in [0, {x.max().item():g}] (0..255? use "
                         "x / 127.5 - 1)")
    x = x.double()
    var_u = dct2(x).var(0, unbiased=True).mean(0)  # [H, W], averaged over channels
    low, high = band_masks(*x.shape[-2:])
    return {
        "n": x.shape[0],
        "shape": tuple(x.shape[1:]),  # [C, H, W]: compare() needs images of one shape
        "saturated": (x.abs() > SATURATED).double().mean().item(),
        "mean": x.mean().item(),
        "std": x.std().item(),
        "dct_var": var_u,
        "dct_var_low": var_u[low].mean().item(),
        "dct_var_high": var_u[high].mean().item(),
    }


def compare(samples: torch.Tensor | dict, data: torch.Tensor | dict) -> dict:
    """Sample statistics as ratios to the data's: ``saturated``, ``std``, ``dct_low`` and ``dct_high`` (the DCT std of
    the lowest / highest tenth of the frequencies), 1.0 meaning "like the data"; ``dct_worst`` is the largest
    ``|log|`` std ratio over all frequencies, as a ratio; ``mean`` and ``data_mean`` are the pixel means."""
    s = samples if isinstance(samples, dict) else image_statistics(samples)
    d = data if isinstance(data, dict) else image_statistics(data)
    for which, stats in (("samples", s), ("data", d)):
        if missing := {"shape", "saturated", "mean", "std", "dct_var", "dct_var_low", "dct_var_high"} - stats.keys():
            raise ValueError(f"the {which}' statistics lack {', '.join(sorted(missing))}: give images, or a dict from "
                             "image_statistics")
    if s["shape"] != d["shape"]:  # a grey sample's statistics against colour data's mean nothing
        raise ValueError(f"samples of shape [C, H, W] = {list(s['shape'])} against data of shape {list(d['shape'])}: "
                         "compare images of one shape")
    if min(d["std"], d["dct_var_low"] ** 0.5, d["dct_var_high"] ** 0.5) <= 1e-9:  # round-off of a constant
        raise ValueError("the data is constant (zero variance): there is nothing to compare the samples with")
    per_freq = (s["dct_var"] / d["dct_var"].clamp(min=1e-12)).sqrt()
    return {
        "saturated": s["saturated"] / max(d["saturated"], 1e-12),
        "std": s["std"] / d["std"],
        "dct_low": (s["dct_var_low"] / d["dct_var_low"]) ** 0.5,
        "dct_high": (s["dct_var_high"] / d["dct_var_high"]) ** 0.5,
        "dct_worst": per_freq.log().abs().max().exp().item(),
        "mean": s["mean"],
        "data_mean": d["mean"],
    }

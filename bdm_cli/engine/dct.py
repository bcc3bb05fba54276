"""Orthonormal 2-D DCT-II over the last two dimensions.

Blurring diffusion works in the frequency space of the type-II DCT (Hoogeboom &
Salimans 2023, Sec. 3): ``u = V^T x`` with ``V^T`` the orthonormal DCT, so that
heat dissipation (blur) becomes an element-wise scaling of ``u``.

The transform is two matrix products with cached DCT matrices, which is faster
than an FFT-based DCT at the 8..256 px sizes diffusion models use, works on any
H x W, any float dtype, CPU and CUDA, and is differentiable.
"""

from __future__ import annotations

import functools
import math

import torch

from .checks import check_whole

__all__ = ["dct2", "idct2", "dct_matrix"]


@functools.lru_cache(maxsize=16)
def _dct_matrix_f64(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


MAX_SIDE = 8192  # an n x n float64 matrix of 512 MB: beyond any image bdm trains on (a 1 x 50000 strip wanted 20 GB)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The n x n orthonormal DCT-II matrix ``C`` (``dct(x) = C @ x``, ``C^-1 = C^T``)."""
    check_whole(n, "n", 1, MAX_SIDE)
    dtype, device = torch.float64 if dtype is None else dtype, "cpu" if device is None else device
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:  # an integer matrix rounds every entry (all below 1) to 0
        raise TypeError(f"dct_matrix needs a floating-point dtype, got {dtype}")
    if torch.device(device).type == "meta":
        raise TypeError("dct_matrix needs values: the meta device holds none")
    return _dct_matrix_cast(n, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)  # one per size, dtype and device in use: a handful; never a growing pile of sizes
def _dct_matrix_cast(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built in float64 on the CPU and cast once, so float32 matrices are exact to rounding.
    return _dct_matrix_f64(n).to(device=device, dtype=dtype)


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"dct2/idct2 need a torch.Tensor, got {type(x).__name__}")
    if x.is_meta:
        raise TypeError("dct2/idct2 got a meta tensor (a shape without values)")
    if x.ndim < 2:
        raise ValueError(f"dct2/idct2 need at least 2 dims, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"dct2/idct2 need a floating-point tensor, got {x.dtype}")
    if 0 in x.shape[-2:]:
        raise ValueError(f"dct2/idct2 need images of at least 1 x 1, got shape {tuple(x.shape)}")
    if max(x.shape[-2:]) > MAX_SIDE:  # each side's transform is a dense n x n matrix
        raise ValueError(f"dct2/idct2 take sides up to {MAX_SIDE}, got shape {tuple(x.shape)}")


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of ``x`` over its last two dims (``scipy.fft.dctn(norm="ortho")``)."""
    _check(x)
    ch = dct_matrix(x.shape[-2], x.dtype, x.device)
    cw = dct_matrix(x.shape[-1], x.dtype, x.device)
    return ch @ x @ cw.T


def idct2(u: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (the orthonormal DCT-III): ``idct2(dct2(x)) == x``."""
    _check(u)
    ch = dct_matrix(u.shape[-2], u.dtype, u.device)
    cw = dct_matrix(u.shape[-1], u.dtype, u.device)
    return ch.T @ u @ cw

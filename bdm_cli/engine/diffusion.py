"""Forward process, training loss and the reverse-step posterior (Hoogeboom & Salimans 2023, Sec. 3).

All functions are pure: noise and times are passed in, so each formula can be
checked against a float64 reference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .dct import dct2, idct2
from .schedule import BlurSchedule

__all__ = ["diffuse", "eps_loss", "denoise_mean_var", "posterior_coefficients", "Model"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A network mapping ``(z_t [B,C,H,W], t [B])`` to ``eps_hat [B,C,H,W]``."""


def _alpha_sigma64(schedule: BlurSchedule, t, like: torch.Tensor):
    """Schedule values for ``like``'s image size, in float64 (cast only once they are combined)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device).reshape(-1)
    return schedule.alpha_sigma(t, like.shape[-2], like.shape[-1])


def diffuse(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: BlurSchedule) -> torch.Tensor:
    """Sample ``z_t ~ q(z_t | x)``: ``z_t = IDCT(alpha_t * DCT(x)) + sigma_t * noise`` (Eq. 9).

    ``x`` and ``noise`` are [B, C, H, W], ``t`` is [B] (or a scalar) in [0, 1].
    """
    alpha, sigma = _alpha_sigma64(schedule, t, x)
    return idct2(alpha.to(x.dtype) * dct2(x)) + sigma.to(x.dtype) * noise


def eps_loss(model: Model, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: BlurSchedule) -> torch.Tensor:
    """The paper's training loss: ``mean ||noise - model(z_t, t)||^2`` (plain MSE on eps)."""
    z_t = diffuse(x, t, noise, schedule)
    eps_hat = model(z_t, t.to(x.dtype))
    return F.mse_loss(eps_hat.float(), noise.float())


def posterior_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, delta: float = 1e-8):
    """Per-frequency coefficients of ``p(z_s | z_t)`` in DCT space (Sec. 3, "denoising process").

    With ``alpha_ts = alpha_t / alpha_s`` and ``sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2``::

        var  = 1 / (1/sigma_s^2 + alpha_ts^2 / sigma2_ts)             (clipped by delta)
        mean = alpha_ts var / sigma2_ts * u_t + var / (alpha_ts sigma_s^2) * (u_t - sigma_t eps_u)

    Returned as ``(c_u, c_eps, var)`` so that ``mean_u = c_u * u_t + c_eps * eps_u``.
    """
    alpha_ts = alpha_t / alpha_s
    sigma2_s = sigma_s**2
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma2_s
    var = 1 / (1 / sigma2_s.clamp(min=delta) + 1 / (sigma_t**2 / alpha_ts**2 - sigma2_s).clamp(min=delta)).clamp(min=delta)
    c_zt = alpha_ts * var / (sigma2_ts + delta)
    c_x = var / (alpha_ts * sigma2_s.clamp(min=delta))
    return c_zt + c_x, -sigma_t * c_x, var


def denoise_mean_var(z_t, t, s, eps_hat, schedule: BlurSchedule, delta: float = 1e-8):
    """Mean and per-frequency variance of the Gaussian ``p(z_s | z_t)``, any ``0 <= s < t``.

    ``mean`` has ``z_t``'s shape (pixel space); ``var`` is [B, 1, H, W] in DCT space, so a
    sample is ``mean + IDCT(sqrt(var) * e)`` with ``e`` standard normal.
    """
    c_u, c_eps, var = (
        c.to(z_t.dtype)
        for c in posterior_coefficients(*_alpha_sigma64(schedule, t, z_t), *_alpha_sigma64(schedule, s, z_t), delta)
    )
    mean = idct2(c_u * dct2(z_t) + c_eps * dct2(eps_hat))
    return mean, var

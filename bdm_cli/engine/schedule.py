"""The blurring-diffusion noise schedule (Hoogeboom & Salimans 2023, Sec. 3-4).

``alpha_t`` is a per-frequency signal scale ``a_t * d_t`` with ``(a_t, sigma_t)``
the variance-preserving cosine schedule and ``d_t`` the heat-dissipation
(blur) damping of DCT frequency ``(k, l)``::

    logsnr(t)     = -2 log tan(limit_min * t + limit_max)           (cosine, clipped)
    a_t           = sqrt(sigmoid(logsnr)),  sigma_t = sqrt(sigmoid(-logsnr))
    sigma_blur(t) = sigma_blur_max * sin(t pi / 2)^2                 ("sin2", Eq. 11)
    tau_t         = sigma_blur(t)^2 / 2
    lambda[k, l]  = (pi k / H)^2 + (pi l / W)^2
    d_t           = (1 - d_min) exp(-lambda tau_t) + d_min           (Eq. 10)

``sigma_blur_max = 0`` gives ``d_t = 1``: plain cosine Gaussian diffusion.
Every method is a pure function of its tensor arguments and keeps their dtype,
so float64 references are a dtype away.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["BlurSchedule", "BLURS"]

BLURS = ("sin2", "linear")


@dataclass(frozen=True)
class BlurSchedule:
    """Cosine VP schedule with per-frequency blur. All times ``t`` are tensors in [0, 1]: not checked here (these
    formulas run inside every step); :func:`diffuse`, :func:`eps_loss`, :func:`denoise_mean_var` and :func:`sample`
    check what they are given."""

    sigma_blur_max: float = 20.0
    blur: str = "sin2"
    d_min: float = 0.001
    logsnr_min: float = -10.0
    logsnr_max: float = 10.0

    def __post_init__(self) -> None:
        for name in ("sigma_blur_max", "d_min", "logsnr_min", "logsnr_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))  # a Fraction or numpy number: torch multiplies floats
        if self.blur not in BLURS:
            raise ValueError(f"blur must be one of {', '.join(BLURS)}, got {self.blur!r}")
        if not 0 <= self.sigma_blur_max <= 1000:  # beyond the image's size every frequency is blurred out anyway
            raise ValueError(f"sigma_blur_max must be in [0, 1000], got {self.sigma_blur_max}")
        # 1 would keep every frequency whole: no blur, whatever sigma_blur_max says. Below 1e-6 a blurred-out
        # frequency's x prediction scales eps by over 1e8 / a_t, and at 1e-300 float32 overflows into NaN samples
        if not 1e-6 <= self.d_min < 1:
            raise ValueError(f"d_min must be in [1e-6, 1), got {self.d_min}"
                             + (" (1 is no blur: for that, set sigma_blur_max to 0)" if self.d_min == 1 else ""))
        # the paper clips to [-10, 10] (VDM's range is [-5, 13.3], EDM's [-8.8, 12.4]); exp(25) stays finite. Sampling
        # starts from pure noise, which is the process at t = 1 only if the images are all but gone there (at -5,
        # 0.7% of their variance is left), and ends with what the model learnt at t = 0, a blur of the data if it never
        # saw them nearly clean (a range of [49, 50] or [-50, -49] trained and sampled without a word)
        if not (-50 <= self.logsnr_min <= -5 and 5 <= self.logsnr_max <= 50):
            raise ValueError(f"logsnr_min must be in [-50, -5] and logsnr_max in [5, 50], got {self.logsnr_min} and "
                             f"{self.logsnr_max}: sampling starts from pure noise, so at t = 1 the images must be all but "
                             "gone, and at t = 0 all but clean (the paper clips to [-10, 10])")

    # -- the base cosine schedule -------------------------------------------------
    @property
    def _limits(self) -> tuple[float, float]:
        limit_max = math.atan(math.exp(-0.5 * self.logsnr_max))
        limit_min = math.atan(math.exp(-0.5 * self.logsnr_min)) - limit_max
        return limit_min, limit_max

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """Base log-SNR ``log(a_t^2 / sigma_t^2)`` of the cosine schedule, clipped to [logsnr_min, logsnr_max]."""
        limit_min, limit_max = self._limits
        return -2.0 * torch.log(torch.tan(limit_min * t + limit_max))

    def t_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`logsnr` (used for log-SNR-uniform sampling grids)."""
        limit_min, limit_max = self._limits
        return (torch.atan(torch.exp(-0.5 * logsnr)) - limit_max) / limit_min

    def a_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, sigma_t)`` of the base schedule, ``a_t^2 + sigma_t^2 = 1``; same shape as ``t``."""
        logsnr = self.logsnr(t)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    # -- the blur -----------------------------------------------------------------
    def sigma_blur(self, t: torch.Tensor) -> torch.Tensor:
        """Blur standard deviation in pixels: ``sigma_blur_max sin^2(t pi/2)`` or ``sigma_blur_max t``."""
        if self.blur == "sin2":
            return self.sigma_blur_max * torch.sin(t * (math.pi / 2)) ** 2
        return self.sigma_blur_max * t

    @staticmethod
    def frequencies(height: int, width: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
        """``lambda[k, l] = (pi k / H)^2 + (pi l / W)^2``, shape [H, W]."""
        k = (math.pi / height) * torch.arange(height, dtype=dtype, device=device)
        l = (math.pi / width) * torch.arange(width, dtype=dtype, device=device)
        return k[:, None] ** 2 + l[None, :] ** 2

    def damping(self, lam_tau: torch.Tensor) -> torch.Tensor:
        """``(1 - d_min) exp(-lambda tau) + d_min`` for given ``lambda tau``. Past ``40 - log(d_min)`` the exponential is
        below half an ulp of d_min (e^-40 < 2^-54), so capping it there changes no result, and it keeps exp out of
        subnormal numbers, which are 20x slower on CPUs (blurred-out frequencies reach lambda tau of thousands)."""
        return (1 - self.d_min) * torch.exp(-lam_tau.clamp(max=40.0 - math.log(self.d_min))) + self.d_min

    def d(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Per-frequency damping ``d_t = (1 - d_min) exp(-lambda tau_t) + d_min``, shape [B, 1, H, W]."""
        tau = (self.sigma_blur(t) ** 2 / 2).reshape(-1, 1, 1, 1)
        lam = self.frequencies(height, width, dtype=t.dtype, device=t.device)
        return self.damping(lam * tau)

    def alpha_sigma(self, t: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_t = a_t d_t`` per frequency, shape [B, 1, H, W], and ``sigma_t``, shape [B, 1, 1, 1]."""
        t = torch.as_tensor(t).reshape(-1)
        if not t.is_floating_point():
            t = t.double()
        a, sigma = self.a_sigma(t)
        if self.sigma_blur_max == 0:
            # Exactly standard diffusion: no exp/d_min round-off enters alpha.
            alpha = a.reshape(-1, 1, 1, 1).expand(-1, 1, height, width)
        else:
            alpha = a.reshape(-1, 1, 1, 1) * self.d(t, height, width)
        return alpha, sigma.reshape(-1, 1, 1, 1)

    def logsnr_freq(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Per-frequency log-SNR ``log(alpha_t^2 / sigma_t^2)``, shape [B, 1, H, W]."""
        alpha, sigma = self.alpha_sigma(t, height, width)
        return 2 * (torch.log(alpha) - torch.log(sigma))

"""Samplers as functions: ``sample(model, noise, schedule, steps, ...)``.

Every sampler keeps the state in DCT space, where every per-frequency coefficient is an element-wise
product, and steps ``t_i -> t_{i+1}`` along a grid from ``t = 1`` to ``t = 0`` with the model's x
prediction ``x_hat = (u_t - sigma_t DCT(eps)) / alpha_t`` per frequency:

* ``ancestral`` (the paper, Sec. 3): ``u_s = mean_u + sqrt(var) * e`` with the Gaussian
  posterior ``p(z_s | z_t)``; the last step returns the mean.
* ``ddim``: the deterministic per-frequency DDIM step ``u_s = (sigma_s / sigma_t) u_t + alpha_s (1 - e^-h) x_hat``,
  ``h = lambda_s - lambda_t`` in ``lambda = log(alpha / sigma)``: exact along the probability-flow ODE for a
  constant ``x_hat`` (first-order DPM-Solver++, as gDDIM generalises DDIM to a per-frequency alpha).
* ``heun``: EDM-style second-order Heun steps on the same ODE (two network calls a step).
* ``dpmpp-2m``: DPM-Solver++(2M), second-order multistep (one network call a step).
* ``unipc``: the same with UniPC's corrector, which reuses the next step's network call (one a step).

Each is one small function over shared helpers (k-diffusion's layout): its per-frequency coefficients are
computed once per call, in float64, for every step, and :class:`_Predictor` is the network as they see it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Sequence

import torch

from .checks import NonFiniteOutput, check_bounds, check_generator, check_images, check_model_output, check_schedule, check_whole
from .dct import dct2, idct2
from .diffusion import Model, posterior_coefficients
from .schedule import BlurSchedule

__all__ = ["sample", "time_grid", "randn", "Step", "SAMPLERS", "GRIDS", "default_grid", "nfe"]

SAMPLERS = ("ancestral", "ddim", "heun", "dpmpp-2m", "unipc")
GRIDS = ("uniform", "logsnr", "spectral")
MAX_STEPS = 4000

Generator = torch.Generator | Sequence[torch.Generator] | None


def default_grid(sampler: str) -> str:
    """Uniform in t for the paper's ancestral sampler; the blur-aware spectral grid for the ODE
    samplers, where it is far more accurate at few steps."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return "uniform" if sampler == "ancestral" else "spectral"


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations a call of :func:`sample` makes: one per step (Heun: two per step but the last), and for the
    deterministic samplers one more at t = 0, whose x prediction is the sample."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    check_whole(steps, "steps")
    if sampler == "ancestral":
        return steps
    return 2 * steps if sampler == "heun" else steps + 1


def time_grid(schedule: BlurSchedule, steps: int, grid: str = "uniform", size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    """``steps + 1`` float64 time points from 1 down to 0.

    * ``uniform``: uniform in t (the paper).
    * ``logsnr``: uniform in the base log-SNR (t from inverting the cosine schedule).
    * ``spectral``: uniform in the base log-SNR plus the mean over frequencies of the
      per-frequency log-SNR ``2 log(alpha_t / sigma_t)``, both clipped to the schedule's
      range. With blur, high frequencies lose their signal (``d_t -> d_min``) within a
      short span of t that the base log-SNR grid crosses in a step or two; this grid also
      spends steps there. Without blur it is exactly the ``logsnr`` grid.
      ``size`` is the image size (H, W) that sets the frequencies.
    """
    check_schedule(schedule)
    check_whole(steps, "steps", 1, MAX_STEPS)
    if not (isinstance(size, (tuple, list, torch.Size)) and len(size) == 2):
        raise ValueError(f"size must be the image's (height, width), got {size!r}")
    for side in size:
        check_whole(side, "size's height and width")
    if grid == "uniform":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if grid == "logsnr" or (grid == "spectral" and schedule.sigma_blur_max == 0):
        logsnr = torch.linspace(schedule.logsnr_min, schedule.logsnr_max, steps + 1, dtype=torch.float64)
        ts = schedule.t_from_logsnr(logsnr).clamp(0.0, 1.0)
    elif grid == "spectral":
        ts = _spectral_grid_cached(schedule, steps, *size).clone()
    else:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    ts[0], ts[-1] = 1.0, 0.0  # exact end points despite round-off
    return ts


@lru_cache(maxsize=64)
def _spectral_grid_cached(schedule: BlurSchedule, steps: int, height: int, width: int) -> torch.Tensor:
    # Every batch of a `bdm sample` run asks for the same grid: computed once (20 ms on a 2-core CPU).
    return _spectral_grid(schedule, steps, height, width)


def _spectral_grid(schedule: BlurSchedule, steps: int, height: int, width: int, fine: int = 4001, bands: int = 128):
    """Equal steps in ``|d logsnr_0| + mean_k |d logsnr_k|``: the base (DC) log-SNR and the mean
    over ``bands`` frequencies evenly spaced in lambda, each clipped to the schedule's range.

    The DC term keeps the steps where the image's mean and coarse shapes form (the mean alone
    jumps over them in one step); the mean term adds steps where blurred frequencies regain
    their signal. Measured on the oracle (tests/test_sampling.py), 50 DDIM steps go from 11%
    to 5.6% median error in the sampled spectrum with blur 20.
    """
    t = torch.linspace(1.0, 0.0, fine, dtype=torch.float64)
    lam_max = (math.pi * (height - 1) / height) ** 2 + (math.pi * (width - 1) / width) ** 2  # the highest frequency's
    lam = torch.linspace(0.0, lam_max, bands, dtype=torch.float64)
    a, sigma = schedule.a_sigma(t)
    tau = schedule.sigma_blur(t) ** 2 / 2
    d = schedule.damping(lam * tau[:, None])
    logsnr = (2 * torch.log(a[:, None] * d / sigma[:, None])).clamp(schedule.logsnr_min, schedule.logsnr_max)
    base = schedule.logsnr(t).clamp(schedule.logsnr_min, schedule.logsnr_max)
    speed = (base[1:] - base[:-1]).abs() + (logsnr[1:] - logsnr[:-1]).abs().mean(1)
    length = torch.cat([torch.zeros(1, dtype=torch.float64), speed.cumsum(0)])
    length = length / length[-1]
    target = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    j = torch.searchsorted(length, target).clamp(1, fine - 1)
    w = (target - length[j - 1]) / (length[j] - length[j - 1]).clamp(min=1e-300)
    return t[j - 1] + w * (t[j] - t[j - 1])


def randn(shape: Sequence[int], generator: Generator = None, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal noise; with a list of generators, row ``i`` is drawn from ``generator[i]``,
    so a sample depends only on its own generator, not on the batch it is in (EDM's
    StackedRandomGenerator)."""
    if (not isinstance(shape, Sequence) or len(shape) == 0
            or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise ValueError(f"shape must be whole numbers >= 1, at least the batch's, got {shape!r}")
    shape = tuple(int(n) for n in shape)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"noise must be real floating point, got dtype {dtype}")
    if device is not None and torch.device(device).type == "meta":
        raise TypeError("noise needs values: the meta device holds none")
    check_generator(generator, shape[0])
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(*shape, generator=generator, dtype=dtype, device=device)
    return torch.stack([torch.randn(*shape[1:], generator=g, dtype=dtype, device=device) for g in generator])


@dataclass
class Step:
    """What a sampler's ``callback`` receives after each step."""

    i: int  # step index, 0 .. steps-1
    steps: int
    t: float  # time of the network input
    s: float  # time reached by this step
    z: torch.Tensor  # network input z_t (pixels)
    eps: torch.Tensor  # network output at z_t (pixels)
    x_u: torch.Tensor  # the x prediction at this step, DCT space

    @property
    def denoised(self) -> torch.Tensor:
        """The model's prediction of x at this step (pixels): ``IDCT((DCT(z_t) - sigma_t DCT(eps)) / alpha_t)``."""
        return idct2(self.x_u)


class _Predictor:
    """The network as the samplers see it: ``x_hat(u, i)`` is the x prediction in DCT space at grid point ``i``,
    ``(u - sigma_i DCT(eps)) / alpha_i``, bounded as asked; ``x_hat.done(i, x_u)`` reports step ``i`` to the callback."""

    def __init__(self, model, ts, alpha, sigma, batch, bounds, clip, callback):
        self.model, self.ts, self.alpha, self.sigma, self.batch = model, ts, alpha, sigma, batch
        self.t_in = ts.to(alpha.device, alpha.dtype)
        self.bounds, self.clip, self.callback, self.inputs = bounds, clip, callback, {}
        self.bad = torch.zeros(batch, dtype=torch.bool, device=alpha.device)  # samples with a non-finite eps (no sync)

    def __call__(self, u: torch.Tensor, i: int) -> torch.Tensor:
        z = idct2(u)
        eps = self.model(z, self.t_in[i].expand(self.batch))
        check_model_output(eps, z)
        eps = eps.to(u.dtype)
        x_u = (u - self.sigma[i] * dct2(eps)) / self.alpha[i]
        # a non-finite eps, or a finite one so large that x overflows (1/alpha reaches 1e5 in blurred-out frequencies)
        self.bad |= ~x_u.isfinite().flatten(1).all(1)
        if self.bounds is not None:
            x_u = torch.maximum(torch.minimum(x_u, self.bounds[1]), self.bounds[0])
        if self.clip:
            x_u = dct2(idct2(x_u).clamp(-1.0, 1.0))
        if self.callback is not None:
            self.inputs[i] = (z, eps)  # the step's own network input and output, for its Step
        return x_u

    def done(self, i: int, x_u: torch.Tensor) -> None:
        if self.callback is not None:
            z, eps = self.inputs.pop(i)  # the step's own tensors, no longer used by the sampler
            # x_u is the sampler's state: a callback that changes its copy (to show it, say) leaves the samples alone
            self.callback(Step(i, len(self.ts) - 1, float(self.ts[i]), float(self.ts[i + 1]), z, eps, x_u.clone()))


def _cast(*coefficients: torch.Tensor, like: torch.Tensor):
    """float64 coefficients [steps, 1, H, W] -> [steps, 1, 1, H, W] in the state's device and dtype."""
    return tuple(c.unsqueeze(1).to(like.device, like.dtype) for c in coefficients)


def _ddim_coefficients(alpha, sigma):
    """``u_s = c_u u_t + c_x x_hat_t``: ``c_u = sigma_s / sigma_t``, ``c_x = alpha_s (1 - e^-h)`` with
    ``h = lambda_s - lambda_t``, ``lambda = log(alpha / sigma)`` per frequency (DDIM = first-order DPM-Solver++),
    and ``h`` itself."""
    h = torch.log(alpha[1:] / sigma[1:]) - torch.log(alpha[:-1] / sigma[:-1])
    return (sigma[1:] / sigma[:-1]).expand_as(h), -alpha[1:] * torch.expm1(-h), h


def _ancestral(u, x_hat, alpha, sigma, generator):
    """The paper's sampler: ``u_s ~ p(z_s | z_t)``, the per-frequency Gaussian posterior given ``x_hat``; the last step
    returns its mean."""
    c_u, c_x, var = posterior_coefficients(alpha[:-1], sigma[:-1], alpha[1:], sigma[1:])
    c_u, c_x, c_noise = _cast(c_u, c_x, var.sqrt(), like=u)
    steps = len(c_u)
    for i in range(steps):
        x_u = x_hat(u, i)
        u = c_u[i] * u + c_x[i] * x_u
        if i < steps - 1:
            u = u + c_noise[i] * randn(u.shape, generator, dtype=u.dtype, device=u.device)
        x_hat.done(i, x_u)
    return u


def _ddim(u, x_hat, alpha, sigma, generator):
    """Deterministic DDIM per frequency: exact along the probability-flow ODE for a constant ``x_hat``."""
    c_u, c_x, _ = _cast(*_ddim_coefficients(alpha, sigma), like=u)
    for i in range(len(c_u)):
        x_u = x_hat(u, i)
        u = c_u[i] * u + c_x[i] * x_u
        x_hat.done(i, x_u)
    return u


def _heun(u, x_hat, alpha, sigma, generator):
    """EDM-style Heun: the DDIM step as predictor, then the trapezoid on the x prediction at both ends, integrated
    exactly for ``x_hat`` linear in ``lambda`` per frequency (DPM-Solver++ style): ``u_s = u_ddim + c_corr (x_s - x_t)``,
    ``c_corr = alpha_s (h - 1 + e^-h) / h``. Every weight stays in [0, 1], where the trapezoid in ``sigma / alpha``
    (EDM's form) multiplies eps by ``sigma_t / alpha_t``, up to 1e5 for blurred-out frequencies, and diverges.
    The last step is a plain Euler (DDIM) step."""
    c_u, c_x, h = _ddim_coefficients(alpha, sigma)
    phi = torch.where(h > 1e-4, (h - 1 + torch.exp(-h)) / h, h / 2 - h**2 / 6)
    c_u, c_x, c_corr = _cast(c_u, c_x, alpha[1:] * phi, like=u)
    steps = len(c_u)
    for i in range(steps):
        x_u = x_hat(u, i)
        u_next = c_u[i] * u + c_x[i] * x_u
        if i < steps - 1:
            u_next = u_next + c_corr[i] * (x_hat(u_next, i + 1) - x_u)
        u = u_next
        x_hat.done(i, x_u)
    return u


def _multistep(u, x_hat, alpha, sigma, generator, *, corrector: bool):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) per frequency, in ``lambda_k = log(alpha_k / sigma)``, on the x
    prediction, one network call per step: ``u_s = c_u u_t + c_x D`` with ``D = x_t + w (x_t - x_prev)``,
    ``w = h / (2 h_prev)``, first order on the first and the last step.

    ``corrector`` (UniPC's idea, Zhao et al. 2023): the network call at the predicted ``u_s``, which the next step
    needs anyway, also corrects this step, ``u_s = c_u u_t + c_x x_t + c_corr (x_s - x_t)``, the trapezoid of
    :func:`_heun` (exact for ``x_hat`` linear in ``lambda``); the next step goes on from ``x_s``. With blur it is what
    makes few steps work: a frequency whose signal returns within one step (``lambda_k`` jumps by 10 or more: its
    x prediction goes from the prior mean to the data in that step) is integrated with the prediction at both ends,
    where extrapolation from earlier steps cannot know it (measured on the oracle, blur 20, 20 network calls: worst
    frequency 18% off without, 4% with).

    With blur, ``h / h_prev`` can be extreme for such frequencies, and the extrapolation would multiply the difference
    of two x predictions by a huge ``w``: it is capped at ``MULTISTEP_CAP`` (then nearly a first-order step there)."""
    c_u, c_x, h = _ddim_coefficients(alpha, sigma)
    w = torch.zeros_like(h)
    w[1:-1] = (h[1:-1] / (2 * h[:-2])).clamp(max=MULTISTEP_CAP)
    c_corr = alpha[1:] * torch.where(h > 1e-4, (h - 1 + torch.exp(-h)) / h, h / 2 - h**2 / 6)
    c_u, c_x, w, c_corr = _cast(c_u, c_x, w, c_corr, like=u)
    steps = len(c_u)
    x_u, x_prev = x_hat(u, 0), None
    for i in range(steps):
        d = x_u if x_prev is None else x_u + w[i] * (x_u - x_prev)
        u_next = c_u[i] * u + c_x[i] * d
        x_next = x_hat(u_next, i + 1) if i < steps - 1 else None
        if corrector and x_next is not None:
            u_next = c_u[i] * u + c_x[i] * x_u + c_corr[i] * (x_next - x_u)
        x_hat.done(i, x_u)
        u, x_prev, x_u = u_next, x_u, x_next
    return u


MULTISTEP_CAP = 1.0
_SAMPLERS = {"ancestral": _ancestral, "ddim": _ddim, "heun": _heun, "dpmpp-2m": partial(_multistep, corrector=False),
            "unipc": partial(_multistep, corrector=True)}


@torch.no_grad()
def sample(
    model: Model,
    noise: torch.Tensor,
    schedule: BlurSchedule,
    steps: int,
    *,
    sampler: str = "ancestral",
    grid: str | None = None,
    generator: Generator = None,
    callback: Callable[[Step], None] | None = None,
    denoised_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Draw samples by integrating the reverse process from ``z_1 = noise`` to ``t = 0``.

    Args:
        model: ``(z_t [B,C,H,W], t [B]) -> eps_hat``.
        noise: the starting point ``z_1``, standard normal, [B, C, H, W].
        schedule: the :class:`BlurSchedule` the model was trained with.
        steps: number of steps, 1 .. 4000 (Heun makes ``2 steps - 1`` network calls).
        sampler: ``"ancestral"`` (the paper), ``"ddim"``, ``"heun"``, ``"dpmpp-2m"`` or ``"unipc"`` (the most
            accurate at 10 to 50 network calls; see the README's sampler table).
        grid: ``"uniform"`` in t, ``"logsnr"`` (uniform in base log-SNR) or ``"spectral"``
            (blur-aware, see :func:`time_grid`); default
            :func:`default_grid` of the sampler.
        generator: a ``torch.Generator`` or one per sample, for the ancestral noise.
        callback: called with a :class:`Step` after every step (progress bars, trajectories).
        denoised_range: ``(low_u, high_u)``, per-frequency bounds of the data, each exactly ``noise``'s [C, H, W] in
            DCT space, finite, with ``low_u <= high_u``: the x prediction is clamped into them, frequency by
            frequency, before each step. With blur this
            is what keeps a sampler from diverging: an eps error ``e`` in a blurred-out frequency is an
            x error ``sigma_t e / alpha_t`` (up to 1e5 e), which unbounded can swamp the sample when
            that frequency regains its signal. ``E[u | z_t]`` lies within the data's range of ``u`` in
            every frequency, so the clamp never moves a prediction further from it, and it leaves the
            well-predicted (low) frequencies alone.
        clip_denoised: clip the x prediction to [-1, 1] in pixel space (DDPM's ``clip_denoised``). Off
            by default: with blur the x prediction carries large high-frequency errors, and clipping
            their sum with the image in pixels also cuts the image's contrast (measured on the
            digits, blur 2: 0.15x the data's saturated pixels, where the per-frequency clamp gives ~1x).

    Returns:
        ``z_0``, the samples in pixel space, same shape and dtype as ``noise``.

    Raises:
        NonFiniteOutput: the model returned NaN or inf for some sample at some step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    check_whole(steps, "steps", 1, MAX_STEPS)
    check_images(noise, "noise")
    if noise.device.type == "cpu" and not bool(torch.isfinite(noise).all()):  # as check_times: no host sync on a GPU
        raise ValueError("noise must be finite: it holds NaN or inf, and every sample would be NaN")
    check_schedule(schedule)
    check_generator(generator, noise.shape[0])
    if not isinstance(clip_denoised, bool):  # "no" is truthy
        raise TypeError(f"clip_denoised must be True or False, got {clip_denoised!r}")
    if noise.dtype == torch.float16 and schedule.sigma_blur_max > 0:
        raise TypeError("float16 cannot hold the blur's per-frequency scales (up to 1e5; the samples would be NaN): "
                        "sample in float32 or bfloat16")
    if denoised_range is not None:
        check_bounds(denoised_range, noise.shape[1:], dtype=noise.dtype)
    grid = default_grid(sampler) if grid is None else grid  # "" or 0 is no grid: time_grid names the choices
    height, width = noise.shape[-2:]
    ts = time_grid(schedule, steps, grid, (height, width))
    alpha, sigma = schedule.alpha_sigma(ts, height, width)  # float64 [N+1, 1, H, W], [N+1, 1, 1, 1]
    bounds = None if denoised_range is None else tuple(b.to(noise.device, noise.dtype) for b in denoised_range)
    state_alpha, state_sigma = (c.unsqueeze(1).to(noise.device, noise.dtype) for c in (alpha, sigma))
    x_hat = _Predictor(model, ts, state_alpha, state_sigma, noise.shape[0], bounds, clip_denoised, callback)
    u = _SAMPLERS[sampler](dct2(noise), x_hat, alpha, sigma, generator)
    if sampler != "ancestral":
        # The ODE ends at z_0, the data plus sigma_0 = 0.0067 noise (log-SNR 10): in the digits' highest frequencies
        # that is as much as the data's own (std 0.0066; 1.43x too much energy). Their sample is the x prediction at
        # t = 0 instead, E[x | z_0] (DPM-Solver's denoise_to_zero; k-diffusion's last step to sigma 0).
        u = x_hat(u, steps)
    x = idct2(u)
    bad = x_hat.bad | ~x.isfinite().flatten(1).all(1)
    if bool(bad.any()):  # one host sync, at the end
        raise NonFiniteOutput(f"the model's output for {int(bad.sum())} of the {noise.shape[0]} samples (the first: sample "
                              f"{int(bad.nonzero()[0])}) is NaN or inf at some step, or so large that their x prediction "
                              "overflows: their samples would be garbage")
    return x

"""Forward process, training loss and the reverse-step posterior (Hoogeboom & Salimans 2023, Sec. 3).

All functions are pure: noise and times are passed in, so each formula can be
checked against a float64 reference.
"""

from __future__ import annotations

import functools
import numbers
import reprlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .dct import dct2, idct2
from .checks import check_images, check_like, check_model_output, check_schedule, check_times
from .schedule import BlurSchedule

__all__ = ["diffuse", "eps_loss", "denoise_mean_var", "posterior_coefficients", "Model"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A network mapping ``(z_t [B,C,H,W], t [B])`` to ``eps_hat [B,C,H,W]``."""


def _alpha_sigma64(schedule: BlurSchedule, t, like: torch.Tensor):
    """Schedule values for ``like``'s image size, in float64 (cast only once they are combined)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device).reshape(-1)
    return schedule.alpha_sigma(t, like.shape[-2], like.shape[-1])


def diffuse(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: BlurSchedule, *,
            check_t: bool = True) -> torch.Tensor:
    """Sample ``z_t ~ q(z_t | x)``: ``z_t = IDCT(alpha_t * DCT(x)) + sigma_t * noise`` (Eq. 9).

    ``x`` and ``noise`` are [B, C, H, W], finite, ``t`` is [B] (or a scalar) in [0, 1]; their values are checked on
    the CPU unless ``check_t=False`` (a training step, whose t is ``torch.rand`` and whose non-finite steps are
    skipped: the check reads the tensors, and on a GPU that would be a host synchronisation).
    """
    if check_t:
        check_times(t)
    check_images(x, "x", batch=t)
    check_schedule(schedule)
    check_like(noise, x, "noise", "x")  # [B, 1, H, W] noise broadcast one noise over every channel
    if check_t and x.device.type == "cpu":  # as sample()'s noise: NaN in, NaN z_t out, without a word
        for name, value in (("x", x), ("noise", noise)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite: it holds NaN or inf")
    alpha, sigma = _alpha_sigma64(schedule, t, x)
    return idct2(alpha.to(x.dtype) * dct2(x)) + sigma.to(x.dtype) * noise


def eps_loss(model: Model, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: BlurSchedule, *,
             check_t: bool = True) -> torch.Tensor:
    """The paper's training loss: ``mean ||noise - model(z_t, t)||^2`` (plain MSE on eps); ``t`` and ``check_t`` as
    in :func:`diffuse`. The model is given ``t`` as [B] in ``x``'s dtype and device, whatever form it came in."""
    z_t = diffuse(x, t, noise, schedule, check_t=check_t)
    eps_hat = model(z_t, torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0]))
    check_model_output(eps_hat, z_t)  # mse_loss would broadcast another shape
    return F.mse_loss(eps_hat.float(), noise.float())


def _check_delta(delta) -> None:
    """The posterior's variance floor: a number in (0, 1) (-1 gave negative, plausible-looking coefficients)."""
    if isinstance(delta, (bool, np.bool_)) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1) (a variance floor), got {reprlib.repr(delta)}")


def posterior_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, delta: float = 1e-8):
    """Per-frequency coefficients of ``p(z_s | z_t)`` in DCT space (Sec. 3, "denoising process").

    With ``alpha_ts = alpha_t / alpha_s`` and ``sigma2_ts = sigma_t^2 - alpha_ts^2 sigma_s^2``::

        var  = 1 / (1/sigma_s^2 + alpha_ts^2 / sigma2_ts)             (clipped by delta)
        mean = alpha_ts var / sigma2_ts * u_t + var / (alpha_ts sigma_s^2) * (u_t - sigma_t eps_u)

    Returned as ``(c_u, c_x, var)`` so that ``mean_u = c_u * u_t + c_x * x_hat_u``, with the model's x
    prediction ``x_hat_u = (u_t - sigma_t eps_u) / alpha_t`` (so ``c_x = alpha_s var / sigma_s^2``).
    """
    _check_delta(delta)
    names = ("alpha_t", "sigma_t", "alpha_s", "sigma_s")
    values = dict(zip(names, (alpha_t, sigma_t, alpha_s, sigma_s)))
    for name, v in values.items():  # True is no alpha; "0.5" failed inside torch; complex lost its imaginary part
        if isinstance(v, torch.Tensor):
            real = not (v.dtype == torch.bool or v.is_complex())
        else:  # numpy's bool, complex, text and object arrays too
            real = not isinstance(v, (bool, str, bytes)) and np.asarray(v).dtype.kind in "fiu"
        if not real:
            raise TypeError(f"{name} must be a real number or tensor, got {reprlib.repr(v)}")
    # numbers and numpy arrays as float64 tensors (their own arithmetic has no clamp)
    alpha_t, sigma_t, alpha_s, sigma_s = (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float64))
                                          for v in values.values())
    try:
        torch.broadcast_shapes(*(v.shape for v in (alpha_t, sigma_t, alpha_s, sigma_s)))
    except RuntimeError:
        raise ValueError("posterior_coefficients' alphas and sigmas must broadcast to one shape, got "
                         + ", ".join(f"{n} {tuple(v.shape)}" for n, v in zip(names, (alpha_t, sigma_t, alpha_s, sigma_s)))) from None
    if all(v.device.type == "cpu" for v in (alpha_t, sigma_t, alpha_s, sigma_s)):  # as check_times: no sync on a GPU
        at, st, as_, ss = (v.double() for v in (alpha_t, sigma_t, alpha_s, sigma_s))
        if not all(bool(v.isfinite().all()) for v in (at, st, as_, ss)):
            raise ValueError("posterior_coefficients needs finite alphas and sigmas, got NaN or inf")
        if not (bool((at > 0).all()) and bool((as_ > 0).all()) and bool((st >= 0).all()) and bool((ss >= 0).all())):
            raise ValueError("posterior_coefficients needs alphas > 0 and sigmas >= 0 (alpha 0 is no signal left: "
                             "its posterior divides by it)")
        if not bool((st * as_ >= ss * at * (1 - 1e-6)).all()):  # s after t: plausible numbers, a wrong posterior
            raise ValueError("posterior_coefficients needs s before t: sigma_t / alpha_t >= sigma_s / alpha_s at every "
                             "frequency")
    # in float64 whatever the inputs' precision (delta 1e-8 is 0 in float16, 1e30 squared inf in float32: NaN came
    # back), returned in theirs
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in (alpha_t, sigma_t, alpha_s, sigma_s)))
    alpha_t, sigma_t, alpha_s, sigma_s = (v.double() for v in (alpha_t, sigma_t, alpha_s, sigma_s))
    alpha_ts = alpha_t / alpha_s
    sigma2_s = sigma_s**2
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma2_s
    var = 1 / (1 / sigma2_s.clamp(min=delta) + 1 / (sigma_t**2 / alpha_ts**2 - sigma2_s).clamp(min=delta)).clamp(min=delta)
    c_u = alpha_ts * var / (sigma2_ts + delta)
    c_x = alpha_s * var / sigma2_s.clamp(min=delta)
    return c_u.to(dtype), c_x.to(dtype), var.to(dtype)


def denoise_mean_var(z_t, t, s, eps_hat, schedule: BlurSchedule, delta: float = 1e-8):
    """Mean and per-frequency variance of the Gaussian ``p(z_s | z_t)``, any ``0 <= s < t``.

    ``mean`` has ``z_t``'s shape (pixel space); ``var`` is [B, 1, H, W] in DCT space, so a
    sample is ``mean + IDCT(sqrt(var) * e)`` with ``e`` standard normal.
    """
    check_times(t)
    check_times(s, "s")
    check_images(z_t, "z_t", batch=t)
    check_images(z_t, "z_t", batch=s)
    check_schedule(schedule)
    check_like(eps_hat, z_t, "eps_hat", "z_t")
    _check_delta(delta)
    if not isinstance(t, torch.Tensor) or t.device.type == "cpu":  # as check_times: no host sync on a GPU
        if not bool((torch.as_tensor(s, dtype=torch.float64) < torch.as_tensor(t, dtype=torch.float64)).all()):
            raise ValueError(f"denoise_mean_var needs s < t, got s={s} and t={t}")
    alpha_t, sigma_t = _alpha_sigma64(schedule, t, z_t)
    c_u, c_x, var = posterior_coefficients(alpha_t, sigma_t, *_alpha_sigma64(schedule, s, z_t), delta)
    c_eps = c_x / alpha_t  # x_hat's 1/alpha_t folded into the float64 coefficient: var / (alpha_ts sigma_s^2)
    u_t = dct2(z_t)
    eps_u = dct2(eps_hat.to(z_t.dtype))  # in z_t's precision: a float64 eps_hat made a float64 mean beside a float32 var
    mean = idct2(c_u.to(z_t.dtype) * u_t + c_eps.to(z_t.dtype) * (u_t - sigma_t.to(z_t.dtype) * eps_u))
    return mean, var.to(z_t.dtype)


def gaussian_eps(z_t: torch.Tensor, t: torch.Tensor, schedule: BlurSchedule, mean_u: torch.Tensor, var_u: torch.Tensor,
                 basis_u: torch.Tensor | None = None) -> torch.Tensor:
    """The exact ``E[eps | z_t]`` if the data were Gaussian in DCT space with per-frequency mean ``mean_u``
    ([C, H, W]) and, at each frequency, a C x C colour covariance ``V diag(var_u) V^T``:
    ``IDCT(sigma_t V (V^T (u_t - alpha_t mean)) / (alpha_t^2 var + sigma_t^2))`` (the posterior of Eq. 9 with a
    Gaussian prior; the noise is isotropic, so it is diagonal in any orthonormal basis).

    ``basis_u`` [C, C, H, W]: ``basis_u[:, k, h, w]`` is the k-th eigenvector of frequency (h, w)'s colour covariance
    and ``var_u[k, h, w]`` its eigenvalue. None: the channels are independent and ``var_u`` their variances. Why the
    basis: the colour channels of natural images correlate at 0.87-0.99 per frequency (CIFAR-10); a Gaussian with
    independent channels draws saturated colour noise (FID 377 against CIFAR-10's test set, 218 with the colour
    covariance), and an early network cannot yet undo it. With ``mean_u = 0`` it is the oracle predictor of the
    sampler tests.
    """
    check_times(t)
    check_images(z_t, "z_t", batch=t)
    check_schedule(schedule)
    check_gaussian(mean_u, var_u, basis_u, z_t.shape[1:])
    mean_u, var_u = mean_u.to(z_t), var_u.to(z_t)  # the images' dtype and device, as precondition() casts them
    return _gaussian_eps(z_t, t, schedule, mean_u, var_u, None if basis_u is None else basis_u.to(z_t))


def _gaussian_eps(z_t, t, schedule, mean_u, var_u, basis_u):
    """:func:`gaussian_eps` without its checks (they read values: a host sync on every training step)."""
    alpha, sigma = _alpha_sigma64(schedule, t, z_t)
    alpha, sigma = alpha.to(z_t.dtype), sigma.to(z_t.dtype)
    r = dct2(z_t) - alpha * mean_u
    if basis_u is not None:
        r = torch.einsum("ckhw,bchw->bkhw", basis_u, r)
    r = sigma * r / (alpha**2 * var_u + sigma**2)
    if basis_u is not None:
        r = torch.einsum("ckhw,bkhw->bchw", basis_u, r)
    return idct2(r)


def check_gaussian(mean_u, var_u, basis_u=None, image_shape=None) -> None:
    """The Gaussian of :func:`gaussian_eps`: ``mean_u`` and positive ``var_u`` [C, H, W] (the images' own shape
    when given: a one-channel Gaussian broadcast over three channels was silently another model), ``basis_u``
    [C, C, H, W]; values read on the CPU only (no host sync on a GPU)."""
    for name, v in (("mean_u", mean_u), ("var_u", var_u)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.ndim != 3 or v.is_meta:
            raise TypeError(f"{name} must be a floating-point tensor [C, H, W], got "
                            f"{type(v).__name__ if not isinstance(v, torch.Tensor) else f'{v.dtype} {tuple(v.shape)}'}")
    if mean_u.shape != var_u.shape or (image_shape is not None and tuple(mean_u.shape) != tuple(image_shape)):
        raise ValueError(f"mean_u {tuple(mean_u.shape)} and var_u {tuple(var_u.shape)} must both be the images' "
                         f"[C, H, W]" + (f" {tuple(image_shape)}" if image_shape is not None else ""))
    if var_u.device.type == "cpu" and not bool((var_u > 0).all() & var_u.isfinite().all() & mean_u.isfinite().all()):
        raise ValueError("var_u must be positive and mean_u, var_u finite")
    if basis_u is not None and (not isinstance(basis_u, torch.Tensor) or not basis_u.is_floating_point() or basis_u.is_meta
                                or tuple(basis_u.shape) != (mean_u.shape[0], *mean_u.shape)):
        raise ValueError(f"basis_u must be real floating point [C, C, H, W] = {[mean_u.shape[0], *mean_u.shape]}")
    if basis_u is not None and basis_u.device.type == "cpu" and not bool(basis_u.isfinite().all()):
        raise ValueError("basis_u must be finite")


def precondition(net: Model, schedule: BlurSchedule, mean_u: torch.Tensor | None, var_u: torch.Tensor | None,
                 basis_u: torch.Tensor | None = None) -> Model:
    """``eps_hat = gaussian_eps(z_t) + net(z_t, t)``: the network predicts only what a Gaussian model of the
    data's spectrum cannot (EDM's skip connection, per frequency).

    Why: in a frequency the blur has removed, ``x_hat = (u_t - sigma_t eps_hat) / alpha_t`` amplifies an
    eps error by ``sigma_t / alpha_t`` (up to 1e5 at d_min = 0.001). A bare network must copy the
    input noise there to 0.1 % to keep ``x_hat`` sane; with the Gaussian skip it only predicts a small
    residual. ``mean_u``/``var_u`` None: the bare network; ``basis_u``: see :func:`gaussian_eps`.
    """
    if mean_u is None or var_u is None:
        return net
    check_gaussian(mean_u, var_u, basis_u)
    # the skip runs in float32 whatever the stored statistics' dtype (a float64 mean met float32 pixels in einsum)
    mean_u, var_u, basis_u = mean_u.float(), var_u.float(), None if basis_u is None else basis_u.float()

    def model(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        basis = None if basis_u is None else basis_u.to(z_t.device)
        check_images(z_t, "z_t", batch=t)  # shapes only: t's values are the sampler's or eps_loss's to check (a
        # per-call read here would be one host read per training step)
        if z_t.shape[1:] != mean_u.shape:  # a shape, no values: broadcasting would quietly make another model
            raise ValueError(f"the preconditioner's statistics are {tuple(mean_u.shape)}, the images "
                             f"{tuple(z_t.shape[1:])}")
        skip = _gaussian_eps(z_t.float(), t, schedule, mean_u.to(z_t.device), var_u.to(z_t.device), basis)  # checked above
        return skip + net(z_t, t).float()

    return model

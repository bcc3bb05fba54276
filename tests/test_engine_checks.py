"""The engine's entry checks (bdm_cli/engine/checks.py): each wrong argument a hostile tester found raises one clear
error naming it, and the valid forms still work."""

import re

import numpy as np
import pytest
import torch

from bdm_cli.engine import BlurSchedule, denoise_mean_var, diffuse, eps_loss, sample, time_grid

S = BlurSchedule(sigma_blur_max=2)
ZERO = lambda z, t: torch.zeros_like(z)  # noqa: E731


def test_denoised_range_must_be_the_noise_shape_finite_and_ordered():
    """Bounds [3, 8, 8] broadcast 1-channel noise into 3-channel samples; a NaN bound gave all-NaN samples; low > high
    clamped every prediction to high."""
    noise = torch.randn(2, 1, 8, 8)
    low, high = -torch.ones(1, 8, 8), torch.ones(1, 8, 8)
    nan, flipped = low.clone(), low.clone()
    nan[0, 2, 3], flipped[0, 1, 1] = float("nan"), 2.0
    cases = [
        ((-torch.ones(3, 8, 8), torch.ones(3, 8, 8)), ValueError, "denoised_range's low_u must have shape [1, 8, 8]"),
        ((low, torch.ones(8, 8)), ValueError, "denoised_range's high_u must have shape [1, 8, 8] (the images' [C, H, W]), got [8, 8]"),
        ((low.long(), high), TypeError, "denoised_range's low_u must be a floating-point tensor, got torch.int64"),
        ((low, high.to(torch.complex64)), TypeError, "denoised_range's high_u must be a floating-point tensor"),
        ((nan, high), ValueError, "denoised_range must be finite with low_u <= high_u everywhere, got low_u nan and high_u 1.0 at [0, 2, 3]"),
        ((low, torch.full((1, 8, 8), float("inf"))), ValueError, "must be finite with low_u <= high_u everywhere"),
        ((flipped, high), ValueError, "got low_u 2.0 and high_u 1.0 at [0, 1, 1]"),
        ([low, high, high], TypeError, "denoised_range must be a pair of tensors (low_u, high_u), each [1, 8, 8]"),
        ((-1.0, 1.0), TypeError, "pair of tensors"),
    ]
    for bounds, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            sample(ZERO, noise, S, 2, denoised_range=bounds)
    for bounds in ((low, high), [low.double(), high.bfloat16()], (low, low)):  # any float dtype; low == high is fine
        out = sample(ZERO, noise, S, 2, denoised_range=bounds)
        assert out.shape == noise.shape and out.isfinite().all()


def test_eps_loss_takes_the_times_diffuse_takes():
    """eps_loss(model, x, 0.5, ...) failed with "'float' object has no attribute 'to'"; the model now always sees t
    as [B] in x's dtype and device."""
    x, noise = torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    seen = []

    def model(z, t):
        seen.append(t)
        return z * t[:, None, None, None]  # depends on t, so the loss shows which times the model saw

    reference = eps_loss(model, x, torch.full((3,), 0.5, dtype=torch.float64), noise, S)
    for t in (0.5, np.float32(0.5), torch.tensor(0.5), torch.tensor([0.5]), torch.full((3,), 0.5, dtype=torch.float32)):
        assert torch.equal(eps_loss(model, x, t, noise, S), reference), t
    assert eps_loss(model, x, 1, noise, S).isfinite()
    assert all(t.shape == (3,) and t.dtype == x.dtype and t.device == x.device for t in seen)
    with pytest.raises(ValueError, match=re.escape("t must be in [0, 1], got 1.5")):
        eps_loss(model, x, 1.5, noise, S)
    with pytest.raises(ValueError, match=re.escape("x holds 3 images but 2 times were given")):
        eps_loss(model, x, torch.rand(2), noise, S)


@pytest.mark.parametrize("run", ["eps_loss", "sample"])
def test_a_model_output_must_be_a_real_float_tensor_of_the_input_shape(run):
    """A tuple or numpy array crashed sample with an AttributeError; integer or complex outputs were cast silently
    (complex losing its imaginary part). One check, the same words, for training and sampling."""
    x = torch.rand(2, 3, 8, 8)
    call = {"eps_loss": lambda m: eps_loss(m, x, torch.rand(2), torch.randn_like(x), S),
            "sample": lambda m: sample(m, torch.randn_like(x), S, 2)}[run]
    cases = [
        (lambda z, t: (torch.zeros_like(z),), TypeError, "the model returned a tuple, not a torch.Tensor of its input's shape (2, 3, 8, 8)"),
        (lambda z, t: np.zeros(z.shape, np.float32), TypeError, "the model returned a ndarray, not a torch.Tensor"),
        (lambda z, t: torch.zeros_like(z[:, :1]), ValueError, "the model returned shape (2, 1, 8, 8) for an input of shape (2, 3, 8, 8)"),
        (lambda z, t: torch.zeros_like(z, dtype=torch.int64), TypeError, "the model returned a torch.int64 tensor, not a real floating-point one"),
        (lambda z, t: torch.zeros_like(z, dtype=torch.complex64), TypeError, "the model returned a torch.complex64 tensor"),
    ]
    for model, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call(model)
    for model in (ZERO, lambda z, t: torch.zeros_like(z, dtype=torch.float64), lambda z, t: torch.zeros_like(z).bfloat16()):
        assert call(model).isfinite().all()


def test_a_schedule_must_be_a_blur_schedule():
    """None or a dict of the schedule's fields failed deep inside with "'NoneType' object has no attribute
    'alpha_sigma'"."""
    x, noise, t = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    calls = {
        "diffuse": lambda s: diffuse(x, t, noise, s),
        "eps_loss": lambda s: eps_loss(ZERO, x, t, noise, s),
        "denoise_mean_var": lambda s: denoise_mean_var(x, 0.5, 0.25, noise, s),
        "sample": lambda s: sample(ZERO, noise, s, 2),
        "time_grid": lambda s: time_grid(s, 2, "spectral"),
    }
    for name, call in calls.items():
        for bad, words in ((None, "NoneType"), (dict(sigma_blur_max=2), "dict"), ("cosine", "str")):
            with pytest.raises(TypeError, match=re.escape(f"schedule must be a BlurSchedule, got {words}")):
                call(bad)
        result = call(S)
        assert all(r.isfinite().all() for r in (result if isinstance(result, tuple) else (result,))), name

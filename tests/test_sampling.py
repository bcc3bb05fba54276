"""The oracle sampler test: Gaussian data with a known spectrum has an exact eps predictor.

For ``x = IDCT(s * g)``, ``g ~ N(0, I)``, the optimal predictor is
``eps_hat = IDCT(sigma_t DCT(z_t) / (alpha_t^2 s^2 + sigma_t^2))``; samples drawn with it must
have per-frequency standard deviation ``s``.
"""

import pytest
import torch

from bdm_cli.engine import BlurSchedule, dct2, idct2, nfe, sample, time_grid

H = W = 8
N = 2000
_k = torch.arange(H, dtype=torch.float64)
SPEC = (1 / (1 + (_k[:, None] ** 2 + _k[None, :] ** 2).sqrt())).float()  # ~1/f, like natural images


def oracle(schedule):
    calls = []

    def model(z, t):
        calls.append(t)
        alpha, sigma = schedule.alpha_sigma(t.double(), H, W)
        alpha, sigma = alpha.float(), sigma.float()
        return idct2(sigma * dct2(z) / (alpha**2 * SPEC**2 + sigma**2))

    model.calls = calls
    return model


def spectrum_error(sigma_blur_max, steps, sampler, grid=None, seed=0):
    schedule = BlurSchedule(sigma_blur_max=sigma_blur_max)
    g = torch.Generator().manual_seed(seed)
    x = sample(oracle(schedule), torch.randn(N, 1, H, W, generator=g), schedule, steps, sampler=sampler, grid=grid,
               generator=g, clip_denoised=False)
    err = (dct2(x).std(0)[0] / SPEC - 1).abs()
    return err.median().item(), err.max().item()


@pytest.mark.parametrize("sigma_blur_max", [0.0, 20.0])
def test_ancestral_1000_steps_matches_spectrum(sigma_blur_max):
    median, worst = spectrum_error(sigma_blur_max, 1000, "ancestral")
    assert median < 0.03 and worst < 0.10, (median, worst)


@pytest.mark.parametrize("sigma_blur_max", [0.0, 20.0])
@pytest.mark.parametrize("sampler,limit", [("ddim", 0.07), ("heun", 0.05)])
def test_deterministic_50_steps_default_grid(sigma_blur_max, sampler, limit):
    median, worst = spectrum_error(sigma_blur_max, 50, sampler)
    assert median < limit, (median, worst)
    assert worst < 0.2, (median, worst)


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
@pytest.mark.parametrize("grid", ["logsnr", "spectral"])
@pytest.mark.parametrize("sigma_blur_max", [0.0, 20.0])
def test_error_shrinks_with_steps(sampler, grid, sigma_blur_max):
    errors = [spectrum_error(sigma_blur_max, steps, sampler, grid)[0] for steps in (5, 20, 100)]
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("sampler,limit", [("ddim", 0.07), ("heun", 0.05)])
def test_logsnr_grid_without_blur(sampler, limit):
    assert spectrum_error(0.0, 50, sampler, "logsnr")[0] < limit


def test_spectral_grid_beats_base_logsnr_grid_with_blur():
    for sampler in ("ddim", "heun"):
        spectral = spectrum_error(20.0, 10, sampler, "spectral")
        base = spectrum_error(20.0, 10, sampler, "logsnr")
        assert spectral[0] < base[0] and spectral[1] < base[1], (sampler, spectral, base)


def test_time_grids():
    s = BlurSchedule(sigma_blur_max=20)
    for grid in ("uniform", "logsnr", "spectral"):
        ts = time_grid(s, 37, grid, (16, 16))
        assert ts.shape == (38,) and ts[0] == 1.0 and ts[-1] == 0.0
        assert (ts[1:] < ts[:-1]).all()
    logsnr = s.logsnr(time_grid(s, 10, "logsnr"))
    assert torch.allclose(logsnr[1:] - logsnr[:-1], torch.full((10,), 2.0, dtype=torch.float64), atol=1e-8)
    assert torch.equal(time_grid(BlurSchedule(0), 10, "spectral"), time_grid(BlurSchedule(0), 10, "logsnr"))


def test_steps_calls_callback_and_nfe():
    schedule = BlurSchedule(sigma_blur_max=20)
    for sampler in ("ancestral", "ddim", "heun"):
        for steps in (1, 2, 7):
            model, seen = oracle(schedule), []
            out = sample(model, torch.randn(3, 1, H, W), schedule, steps, sampler=sampler, callback=seen.append)
            assert out.shape == (3, 1, H, W) and torch.isfinite(out).all()
            assert len(model.calls) == nfe(sampler, steps)
            assert [st.i for st in seen] == list(range(steps))
            assert seen[-1].s == 0.0 and seen[0].t == 1.0
            assert seen[-1].denoised.shape == (3, 1, H, W)


def test_reproducible_and_per_sample_generators():
    schedule = BlurSchedule(sigma_blur_max=20)
    noise = torch.randn(4, 1, H, W)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    a = sample(oracle(schedule), noise, schedule, 20, generator=gens())
    b = sample(oracle(schedule), noise, schedule, 20, generator=gens())
    assert torch.equal(a, b)
    # Sample 2 alone, with its own generator, equals sample 2 of the batch.
    c = sample(oracle(schedule), noise[2:3], schedule, 20, generator=[torch.Generator().manual_seed(2)])
    assert torch.allclose(c[0], a[2], atol=1e-6)


def test_bad_arguments():
    s = BlurSchedule()
    model = oracle(s)
    with pytest.raises(ValueError, match="sampler"):
        sample(model, torch.randn(1, 1, H, W), s, 10, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(model, torch.randn(1, 1, H, W), s, 0)
    with pytest.raises(ValueError, match="steps"):
        sample(model, torch.randn(1, 1, H, W), s, 4001)
    with pytest.raises(ValueError, match="grid"):
        sample(model, torch.randn(1, 1, H, W), s, 10, grid="cosine")

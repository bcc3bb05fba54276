"""The oracle sampler test: Gaussian data with a known spectrum has an exact eps predictor.

For ``x = IDCT(s * g)``, ``g ~ N(0, I)``, the optimal predictor is
``eps_hat = IDCT(sigma_t DCT(z_t) / (alpha_t^2 s^2 + sigma_t^2))``; samples drawn with it must
have per-frequency standard deviation ``s``.
"""

import pytest
import torch

from bdm_cli.engine import SAMPLERS, BlurSchedule, dct2, idct2, nfe, sample, time_grid

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


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp-2m", "unipc"])
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
    for sampler in SAMPLERS:
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


def _digits_range(resolution):
    from bdm_cli.data import load_digits

    x = load_digits(resolution, 1)
    u = dct2(x.double())
    return x, (u.amin(0).float(), u.amax(0).float())


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "heun"])
def test_denoised_range_keeps_a_wrong_network_bounded(sampler):
    """A bare eps network that is wrong (an untrained one, say) under blur: in blurred-out frequencies its x prediction
    is its eps error times sigma_t / alpha_t (up to 1e5). Bounded by the data's per-frequency range, every sampler
    stays within a few times the data's scale (each frequency at most at its extreme); unbounded, it blows up."""
    x, bounds = _digits_range(16)
    schedule = BlurSchedule(sigma_blur_max=4)
    wrong = lambda z, t: 0.9 * z + 0.2 * torch.sin(3 * z)  # noqa: E731  a fixed, plausible-looking, wrong predictor
    noise = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(sampler=sampler, generator=torch.Generator().manual_seed(1))
    bounded = sample(wrong, noise, schedule, 20, denoised_range=bounds, **kw)
    free = sample(wrong, noise, schedule, 20, **kw)
    assert torch.isfinite(bounded).all() and bounded.abs().max() < 5, bounded.abs().max()  # the box, not 1e5
    assert free.abs().max() > 100, free.abs().max()


def test_denoised_range_leaves_good_predictions_alone():
    """The range is the data's own: the exact oracle of data inside it is never clamped, so the samples are the
    unbounded ones to round-off (the per-frequency clamp has no bias where the model is right)."""
    schedule = BlurSchedule(sigma_blur_max=20)
    g = torch.Generator().manual_seed(3)
    wide = (torch.full((1, H, W), -1e3), torch.full((1, H, W), 1e3))
    noise = torch.randn(256, 1, H, W, generator=g)
    for sampler in ("ancestral", "ddim", "heun"):
        a = sample(oracle(schedule), noise, schedule, 25, sampler=sampler, generator=torch.Generator().manual_seed(0))
        b = sample(oracle(schedule), noise, schedule, 25, sampler=sampler, generator=torch.Generator().manual_seed(0),
                   denoised_range=wide)
        assert torch.equal(a, b)


def test_pixel_clipping_greys_where_the_frequency_range_does_not():
    """Why the per-frequency range replaced DDPM's pixel clipping as the default: a blurred digit's x prediction carries
    large high-frequency errors; clipping their sum with the image in pixels cuts the image's contrast too, while
    clamping each frequency to its range leaves the low frequencies (the digit's shape and contrast) alone."""
    from bdm_cli.spectrum import band_masks

    x, (lo, hi) = _digits_range(16)
    u = dct2(x[:256].double()).float()
    _, high = band_masks(16, 16, fraction=0.5)
    err = torch.randn(u.shape, generator=torch.Generator().manual_seed(0)) * high * 3.0  # noise in the upper half
    pixel = dct2(idct2(u + err).clamp(-1, 1))
    freq = torch.maximum(torch.minimum(u + err, hi), lo)
    low, _ = band_masks(16, 16)
    contrast = lambda v: v[..., low].std() / u[..., low].std()  # noqa: E731
    assert contrast(pixel) < 0.8 and abs(contrast(freq) - 1) < 0.02, (contrast(pixel), contrast(freq))


def test_unipc_few_step_goals():
    """Issue #11's goals for the multistep sampler with UniPC's corrector, on the oracle (8x8, 1/f, 2,000 samples;
    the median error of 1,000 ancestral steps, the sampling noise, is ~1.5%), by network evaluations: 19 steps and
    the x prediction at t = 0 are 20."""
    assert nfe("unipc", 19) == 20 and nfe("unipc", 9) == 10
    median, worst = spectrum_error(20.0, 19, "unipc")
    assert median <= 0.02 and worst <= 0.10, (median, worst)
    assert spectrum_error(20.0, 9, "unipc")[0] <= 0.05
    assert spectrum_error(0.0, 9, "unipc")[0] <= 0.03


def test_corrector_beats_plain_multistep_with_blur():
    """The corrector is what the blurred frequencies need: plain DPM-Solver++(2M)'s worst frequency at 20 calls is
    the lowest non-DC one, whose signal returns within one step."""
    plain, corrected = spectrum_error(20.0, 19, "dpmpp-2m"), spectrum_error(20.0, 19, "unipc")
    assert corrected[1] < plain[1] / 2, (plain, corrected)


def test_deterministic_samplers_end_on_the_x_prediction_at_t0():
    """The sample of a deterministic sampler is E[x | z_0], not z_0, which still holds sigma_0 = 0.0067 of noise
    (log-SNR 10). For the Gaussian oracle with every non-DC frequency at std 0.005, below sigma_0, that is the
    shrinkage s^2 / (s^2 + sigma_0^2) of z_0 (std ratio 0.60, where z_0 would give 1.67). For images, whose finest
    frequencies follow from the coarser ones, E[x | z_0] keeps them: the digits' highest tenth goes from 1.41x the
    data's std (z_0) to 1.00x (docs/benchmarks.md)."""
    spec = torch.full((H, W), 0.005)
    spec[0, 0] = 1.0
    schedule = BlurSchedule(sigma_blur_max=0)
    model = _general_oracle(schedule, spec)
    g = torch.Generator().manual_seed(0)
    x = sample(model, torch.randn(2000, 1, H, W, generator=g), schedule, 50, sampler="unipc")
    sigma0 = schedule.a_sigma(torch.zeros((), dtype=torch.float64))[1].item()
    expected = 0.005 / (0.005**2 + sigma0**2) ** 0.5
    ratio = dct2(x).std(0)[0] / spec
    assert ((ratio.flatten()[1:] / expected) - 1).abs().median() < 0.05, (ratio, expected)


def _general_oracle(schedule, spec):
    height, width = spec.shape

    def model(z, t):
        alpha, sigma = schedule.alpha_sigma(t.double(), height, width)
        return idct2(sigma.float() * dct2(z) / (alpha.float() ** 2 * spec**2 + sigma.float() ** 2))

    return model


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "unipc"])
@pytest.mark.parametrize("shape,sigma_blur_max,most", [((1, 8, 12), 40.0, 4000), ((3, 6, 5), 0.0, 400), ((1, 7, 7), 5.0, 400)])
def test_multistep_stable_for_any_steps_size_and_blur(sampler, shape, sigma_blur_max, most):
    """Finite for 1..4000 steps on non-square sizes, 1 or 3 channels, blur 0 to 40, and the error does not grow with
    steps past convergence (per-frequency step ratios are extreme at 4000 uniform-in-t steps with blur 40)."""
    c, h, w = shape
    k = (torch.arange(h, dtype=torch.float64)[:, None] ** 2 + torch.arange(w, dtype=torch.float64)[None, :] ** 2).sqrt()
    spec = (1 / (1 + k)).float()
    schedule = BlurSchedule(sigma_blur_max=sigma_blur_max)
    model = _general_oracle(schedule, spec)
    errors = {}
    for steps, grid in ((1, None), (2, None), (3, None), (100, None), (most, None), (most, "uniform")):
        g = torch.Generator().manual_seed(0)
        x = sample(model, torch.randn(400, c, h, w, generator=g), schedule, steps, sampler=sampler, grid=grid)
        assert torch.isfinite(x).all() and x.abs().max() < 100, (steps, grid)
        errors[steps, grid] = (dct2(x).std(0) / spec - 1).abs().median().item()
    assert errors[most, None] < errors[100, None] + 0.02 and errors[most, "uniform"] < errors[100, None] + 0.02, errors

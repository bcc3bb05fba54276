import pytest
import torch

from bdm_cli.engine import BlurSchedule, dct2, denoise_mean_var, diffuse, eps_loss, idct2


def test_diffuse_matches_float64_formula():
    s = BlurSchedule(sigma_blur_max=20)
    x, noise, t = torch.randn(4, 3, 8, 12), torch.randn(4, 3, 8, 12), torch.rand(4)
    z = diffuse(x, t, noise, s)
    alpha, sigma = s.alpha_sigma(t.double(), 8, 12)
    ref = idct2(alpha * dct2(x.double())) + sigma * noise.double()
    assert z.dtype == torch.float32
    assert (z.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("sigma_blur_max", [0.0, 20.0])
def test_forward_marginal_variance_per_frequency(sigma_blur_max):
    """Var(DCT(z_t)) = alpha_t^2 Var(u) + sigma_t^2 per frequency, within sampling error."""
    s = BlurSchedule(sigma_blur_max=sigma_blur_max)
    g = torch.Generator().manual_seed(0)
    n, h, w = 20000, 8, 8
    k = torch.arange(h, dtype=torch.float64)
    spec = 1 / (1 + (k[:, None] ** 2 + k[None, :] ** 2).sqrt())
    x = idct2(spec * torch.randn(n, 1, h, w, generator=g, dtype=torch.float64))
    for t in (0.05, 0.1, 0.3, 0.7):
        tt = torch.full((n,), t, dtype=torch.float64)
        z = diffuse(x, tt, torch.randn(n, 1, h, w, generator=g, dtype=torch.float64), s)
        alpha, sigma = s.alpha_sigma(tt[:1], h, w)
        expected = alpha[0, 0] ** 2 * spec**2 + sigma[0, 0] ** 2
        ratio = dct2(z).var(0)[0] / expected
        # Each entry's variance estimate has relative std sqrt(2/n) = 1%.
        assert (ratio - 1).abs().max() < 0.05, (t, ratio)


def test_eps_loss_is_mse_of_the_noise():
    s = BlurSchedule(sigma_blur_max=20)
    x, noise, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.rand(3)
    seen = {}

    def model(z, tt):
        seen["z"], seen["t"] = z, tt
        return torch.zeros_like(z)

    loss = eps_loss(model, x, t, noise, s)
    assert loss.item() == pytest.approx(noise.square().mean().item(), rel=1e-6)
    assert torch.allclose(seen["z"], diffuse(x, t, noise, s)) and torch.equal(seen["t"], t)
    perfect = eps_loss(lambda z, tt: noise, x, t, noise, s)
    assert perfect.item() == 0.0


def reference_mean_var(z_t, t, s, eps_hat, sch, delta=1e-8):
    """The issue's formula, written out literally in float64."""
    h, w = z_t.shape[-2:]
    alpha_t, sigma_t = sch.alpha_sigma(torch.tensor([t], dtype=torch.float64), h, w)
    alpha_s, sigma_s = sch.alpha_sigma(torch.tensor([s], dtype=torch.float64), h, w)
    alpha_ts = alpha_t / alpha_s
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    var = 1 / torch.clamp(1 / torch.clamp(sigma_s**2, min=delta) + 1 / torch.clamp(sigma_t**2 / alpha_ts**2 - sigma_s**2, min=delta), min=delta)
    u_t = dct2(z_t)
    mean = idct2(alpha_ts * var / (sigma2_ts + delta) * u_t) + idct2(
        (1 / alpha_ts) * var / torch.clamp(sigma_s**2, min=delta) * (u_t - sigma_t * dct2(eps_hat))
    )
    return mean, var


@pytest.mark.parametrize("t,s", [(1.0, 0.9), (0.5, 0.49), (0.3, 0.0), (0.02, 0.01)])
def test_denoise_mean_var_matches_reference(t, s):
    sch = BlurSchedule(sigma_blur_max=20)
    z, eps = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mean, var = denoise_mean_var(z, torch.tensor([t, t], dtype=torch.float64), torch.tensor([s, s], dtype=torch.float64), eps, sch)
    ref_mean, ref_var = reference_mean_var(z, t, s, eps, sch)
    assert var.shape == (2, 1, 8, 8)
    assert torch.allclose(var, ref_var.expand_as(var), rtol=1e-10)
    assert torch.allclose(mean, ref_mean, rtol=1e-8, atol=1e-8 * ref_mean.abs().max().item())


def test_no_blur_posterior_is_ddpm():
    """sigma_blur_max = 0: q(z_s | z_t, x) of standard VP diffusion (Kingma et al. 2021, Eq. 29)."""
    sch = BlurSchedule(sigma_blur_max=0)
    t, s = 0.6, 0.4
    x, eps = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    z_t = diffuse(x, torch.tensor([t, t]), eps, sch)
    mean, var = denoise_mean_var(z_t, t, s, eps, sch)  # eps_hat = true eps -> x_hat = x
    (a_t, a_s), (sig_t, sig_s) = sch.a_sigma(torch.tensor([t, s], dtype=torch.float64))
    a_ts = a_t / a_s
    s2_ts = sig_t**2 - a_ts**2 * sig_s**2
    ref_mean = a_ts * sig_s**2 / sig_t**2 * z_t + a_s * s2_ts / sig_t**2 * x
    assert torch.allclose(mean, ref_mean, atol=1e-7)
    assert torch.allclose(var, (s2_ts * sig_s**2 / sig_t**2).expand_as(var), rtol=1e-6)

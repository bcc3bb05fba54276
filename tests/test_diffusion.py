import pytest
import torch

from bdm_cli.engine import BlurSchedule, dct2, denoise_mean_var, diffuse, eps_loss, gaussian_eps, idct2


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


def test_gaussian_eps_with_colour_covariance_matches_a_per_frequency_solve():
    """E[eps | z_t] for Gaussian data with a full C x C colour covariance per frequency: eigenbasis form against
    ``sigma (alpha^2 S + sigma^2 I)^-1 (u_t - alpha mean)`` solved frequency by frequency, float64."""
    sch = BlurSchedule(sigma_blur_max=20)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.01 * torch.eye(3, dtype=torch.float64)  # [H, W, C, C]
    var, basis = torch.linalg.eigh(cov)
    mean = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    z = torch.randn(4, 3, 6, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.3, 0.7, 1.0], dtype=torch.float64)
    got = gaussian_eps(z, t, sch, mean, var.permute(2, 0, 1), basis.permute(2, 3, 0, 1))
    alpha, sigma = sch.alpha_sigma(t, 6, 5)  # [B, 1, H, W], [B, 1, 1, 1]
    a_, s_ = alpha[:, 0, :, :, None, None], sigma[:, 0, :, :, None, None]  # [B, H, W, 1, 1]
    r = (dct2(z) - alpha * mean).permute(0, 2, 3, 1)[..., None]  # [B, H, W, C, 1]
    ref = s_ * torch.linalg.solve(a_**2 * cov + s_**2 * torch.eye(3, dtype=torch.float64), r)
    assert torch.allclose(got, idct2(ref[..., 0].permute(0, 3, 1, 2)), rtol=1e-10, atol=1e-12)
    # no basis: independent channels, as before the colour covariance
    diag = torch.diagonal(cov, dim1=-2, dim2=-1).permute(2, 0, 1)
    eye = torch.eye(3, dtype=torch.float64)[:, :, None, None].expand(3, 3, 6, 5)
    assert torch.allclose(gaussian_eps(z, t, sch, mean, diag), gaussian_eps(z, t, sch, mean, diag, eye), rtol=1e-12)


def test_preconditioner_alone_draws_the_datas_colour_correlation():
    """Sampling with a zero network leaves the preconditioner's Gaussian: with data_stats' colour bases its samples
    have the data's channel correlation (0.9 here); without them (independent channels, the old skip) none."""
    from bdm_cli.engine import precondition, sample
    from bdm_cli.train import data_stats

    g = torch.Generator().manual_seed(1)
    mix = torch.linalg.cholesky(torch.full((3, 3), 0.9, dtype=torch.float64) + 0.1 * torch.eye(3, dtype=torch.float64))
    k = torch.arange(8, dtype=torch.float64)
    spec = 0.3 / (1 + (k[:, None] ** 2 + k[None, :] ** 2).sqrt())
    data = list(idct2(spec * torch.einsum("cd,bdhw->bchw", mix, torch.randn(3000, 3, 8, 8, generator=g, dtype=torch.float64))).float())
    stats = data_stats(data)
    assert torch.allclose(torch.einsum("ckhw,cjhw->hwkj", stats["basis_u"], stats["basis_u"]), torch.eye(3), atol=1e-5)
    sch = BlurSchedule(sigma_blur_max=4)
    zero = lambda z, t: torch.zeros_like(z)  # noqa: E731
    corr = {}
    for name, basis in (("colour", stats["basis_u"]), ("independent", None)):
        var = stats["var_u"] if basis is not None else dct2(torch.stack(data).double()).var(0).float()
        model = precondition(zero, sch, stats["mean_u"], var, basis)
        x = sample(model, torch.randn(1000, 3, 8, 8, generator=g), sch, 30, sampler="unipc", generator=g, clip_denoised=False)
        u = dct2(x.double()).permute(1, 0, 2, 3).reshape(3, -1)
        corr[name] = torch.corrcoef(u)[0, 1:].mean().item()
    assert abs(corr["colour"] - 0.9) < 0.05 and abs(corr["independent"]) < 0.1, corr

import math

import pytest
import torch

from bdm_cli.engine import BlurSchedule


def cosine_ref(t, lo=-10.0, hi=10.0):
    limit_max = math.atan(math.exp(-0.5 * hi))
    limit_min = math.atan(math.exp(-0.5 * lo)) - limit_max
    return -2 * math.log(math.tan(limit_min * t + limit_max))


def test_base_schedule_values():
    s = BlurSchedule(sigma_blur_max=20)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    logsnr = s.logsnr(t)
    # Hand values: the clipping makes t=0 and t=1 hit the limits exactly; t=0.5 is the symmetric midpoint.
    assert logsnr.tolist() == pytest.approx([10.0, 0.0, -10.0], abs=1e-12)
    a, sigma = s.a_sigma(t)
    assert a.tolist() == pytest.approx([math.sqrt(1 / (1 + math.exp(-10))), math.sqrt(0.5), math.sqrt(1 / (1 + math.exp(10)))], abs=1e-12)
    assert torch.allclose(a**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    assert s.logsnr(torch.tensor(0.3, dtype=torch.float64)).item() == pytest.approx(cosine_ref(0.3), abs=1e-12)


def test_blur_values():
    s = BlurSchedule(sigma_blur_max=20)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert s.sigma_blur(t).tolist() == pytest.approx([0.0, 10.0, 20.0])
    assert BlurSchedule(10, blur="linear").sigma_blur(t).tolist() == pytest.approx([0.0, 5.0, 10.0])
    lam = BlurSchedule.frequencies(4, 8)
    assert lam[1, 2].item() == pytest.approx((math.pi / 4) ** 2 + (math.pi * 2 / 8) ** 2)
    d = s.d(t, 4, 8)
    # d at t=0.5: (1 - d_min) exp(-lambda * 10^2 / 2) + d_min
    assert d[1, 0, 1, 2].item() == pytest.approx((1 - 0.001) * math.exp(-lam[1, 2].item() * 50) + 0.001)
    assert torch.allclose(d[0], torch.ones(1, 4, 8, dtype=torch.float64))
    assert d[:, 0, 0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # the DC frequency is never blurred


def test_alpha_shapes_and_broadcasting():
    s = BlurSchedule(sigma_blur_max=20)
    alpha, sigma = s.alpha_sigma(torch.rand(5), 6, 10)
    assert alpha.shape == (5, 1, 6, 10) and sigma.shape == (5, 1, 1, 1)
    x = torch.randn(5, 3, 6, 10)
    assert (alpha * x).shape == x.shape
    a, _ = s.a_sigma(torch.tensor([0.25]))
    alpha, _ = s.alpha_sigma(torch.tensor([0.25]), 6, 10)
    assert alpha[0, 0, 0, 0].item() == pytest.approx(a.item())
    assert alpha.dtype == torch.float32


def test_logsnr_monotone_and_inverse():
    s = BlurSchedule(sigma_blur_max=20)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    logsnr = s.logsnr(t)
    assert (logsnr[1:] < logsnr[:-1]).all()
    assert torch.allclose(s.t_from_logsnr(logsnr), t, atol=1e-10)
    per_freq = s.logsnr_freq(t, 8, 8)
    assert (per_freq[1:] <= per_freq[:-1] + 1e-12).all()  # every frequency's SNR falls with t


def test_no_blur_is_plain_diffusion():
    s = BlurSchedule(sigma_blur_max=0)
    t = torch.rand(7, dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t, 8, 8)
    a, sig = s.a_sigma(t)
    assert torch.equal(alpha, a.reshape(-1, 1, 1, 1).expand(-1, 1, 8, 8))
    assert torch.equal(sigma.flatten(), sig)


@pytest.mark.parametrize("kwargs", [dict(blur="gauss"), dict(sigma_blur_max=-1), dict(d_min=0), dict(logsnr_min=5, logsnr_max=5)])
def test_invalid(kwargs):
    with pytest.raises(ValueError):
        BlurSchedule(**kwargs)

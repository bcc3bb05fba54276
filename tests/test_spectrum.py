"""The sample-against-data statistics (bdm_cli.spectrum): each ratio moves the way its defect says."""

import torch

from bdm_cli.data import load_digits
from bdm_cli.engine import dct2, idct2
from bdm_cli.spectrum import band_masks, compare, image_statistics


def test_bands_are_disjoint_tenths_ordered_by_lambda():
    low, high = band_masks(16, 12)
    assert low.sum() == high.sum() == round(0.1 * (16 * 12 - 1))
    assert not (low & high).any() and not low[0, 0] and not high[0, 0]
    assert low[0, 1] and low[1, 0] and high[-1, -1]


def test_data_against_itself_is_one():
    x = load_digits(16, 1)
    c = compare(x, x)
    assert all(abs(c[k] - 1) < 1e-12 for k in ("saturated", "std", "dct_low", "dct_high", "dct_worst"))


def test_grey_and_noisy_samples_are_named():
    x = load_digits(16, 1)
    grey = compare(x * 0.6, x)  # lower contrast: fewer saturated pixels, every frequency scaled by 0.6
    assert grey["saturated"] < 0.2 and abs(grey["std"] - 0.6) < 1e-6
    assert abs(grey["dct_low"] - 0.6) < 1e-6 and abs(grey["dct_high"] - 0.6) < 1e-6
    u = dct2(x.double())
    _, high = band_masks(16, 16)
    noise = torch.randn(u.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * high * 0.3
    noisy = compare(idct2(u + noise), x)  # high-frequency noise only: the low band and the mean are untouched
    assert noisy["dct_high"] > 1.5 and abs(noisy["dct_low"] - 1) < 1e-9 and noisy["dct_worst"] > 1.5


def test_statistics_of_a_known_spectrum():
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.1, 1.0, 64).view(8, 8)
    x = idct2(torch.randn(20000, 1, 8, 8, generator=g) * scale)
    s = image_statistics(x)
    assert torch.allclose(s["dct_var"].sqrt(), scale.double(), rtol=0.03)
    assert s["n"] == 20000 and abs(s["mean"]) < 0.01

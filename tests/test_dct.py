import pytest
import scipy.fft
import torch

from bdm_cli.engine import dct2, dct_matrix, idct2


@pytest.mark.parametrize("shape", [(8, 8), (32, 32), (5, 12), (17, 3), (1, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_matches_scipy(shape, dtype, tol):
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    ref = torch.from_numpy(scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho"))
    got = dct2(x.to(dtype)).double()
    assert (got - ref).abs().max() <= tol * max(1.0, ref.abs().max())
    ref_inv = torch.from_numpy(scipy.fft.idctn(x.numpy(), axes=(-2, -1), norm="ortho"))
    assert (idct2(x.to(dtype)).double() - ref_inv).abs().max() <= tol * max(1.0, ref_inv.abs().max())


@pytest.mark.parametrize("shape", [(16, 16), (6, 10)])
def test_round_trip_and_parseval(shape):
    x = torch.randn(4, 3, *shape, dtype=torch.float64)
    u = dct2(x)
    assert torch.allclose(idct2(u), x, atol=1e-12)
    assert torch.allclose(dct2(idct2(x)), x, atol=1e-12)
    assert torch.allclose((u**2).sum((-2, -1)), (x**2).sum((-2, -1)), rtol=1e-12)


def test_orthonormal_matrix():
    for n in (1, 7, 32):
        c = dct_matrix(n)
        assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-13)


def test_differentiable_and_batched_shapes():
    x = torch.randn(2, 5, 8, 6, requires_grad=True)
    dct2(x).square().sum().backward()
    # Orthonormal: the gradient of ||DCT x||^2 is 2x.
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-5)
    assert dct2(torch.randn(7, 9)).shape == (7, 9)


def test_rejects_integer_tensors():
    with pytest.raises(TypeError):
        dct2(torch.ones(4, 4, dtype=torch.int64))

"""Kernel Inception Distance (Binkowski et al. 2018): against torchmetrics 1.9.0 and a naive loop, the reservoir of
feature rows it draws from, the statistics cache, and `bdm fid`'s KID line."""

import numpy as np
import pytest
import torch
from PIL import Image

from bdm_cli import fid

from .conftest import shared_file
from .test_sample_fid import invoke, value


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 64)), rng.normal(size=(250, 64)) + 0.1


# -- the estimate ----------------------------------------------------------------------------------

def test_kernel_distance_equals_torchmetrics_on_the_same_subsets(feats):
    from torchmetrics.image.kid import poly_mmd

    x, y = feats
    opts = dict(subsets=20, subset_size=100, seed=3)
    mean, std = fid.kernel_distance(x, y, **opts)
    theirs = torch.stack([poly_mmd(torch.from_numpy(x[i]), torch.from_numpy(y[j])) for i, j in fid.kid_subsets(300, 250, **opts)])
    assert theirs.dtype == torch.float64
    assert mean == pytest.approx(theirs.mean().item(), abs=1e-6, rel=1e-6)
    assert std == pytest.approx(theirs.std(unbiased=False).item(), abs=1e-6, rel=1e-6)  # KernelInceptionDistance.compute's std
    assert std > 0


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_kernel_distance_equals_torchmetrics_metric_on_the_full_sets(feats):
    """One subset of every row (subset_size capped at n): KernelInceptionDistance.compute with an identity
    feature extractor, whatever permutation it draws, must give the same number."""
    from torchmetrics.image.kid import KernelInceptionDistance

    x, y = feats[0][:250], feats[1]
    kid = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=3, subset_size=250)
    kid.update(torch.from_numpy(x), real=True)
    kid.update(torch.from_numpy(y), real=False)
    theirs_mean, theirs_std = kid.compute()
    mean, std = fid.kernel_distance(x, y, subsets=3)  # subset_size 1000, capped at 250
    assert mean == pytest.approx(theirs_mean.item(), abs=1e-6, rel=1e-6)
    assert std == pytest.approx(theirs_std.item(), abs=1e-6) and std < 1e-12  # the same set three times
    assert mean == pytest.approx(fid.polynomial_mmd(x, y), rel=1e-12)


def test_polynomial_mmd_against_a_naive_double_loop():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) * 1.5
    m, d = x.shape

    def k(a, b):
        return (sum(float(a[t]) * float(b[t]) for t in range(d)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert fid.polynomial_mmd(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12, abs=1e-12)
    assert fid.polynomial_mmd(x.astype(np.float32), y) == pytest.approx(xx + yy - 2 * xy, rel=1e-5)  # float32 in, float64 sums


def test_kid_separates_shifted_sets_and_not_halves():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2000, 16))
    same = fid.kernel_distance(a[:1000], a[1000:], subsets=50, subset_size=200)
    shifted = fid.kernel_distance(a[:1000], a[1000:] + 0.5, subsets=50, subset_size=200)
    assert abs(same[0]) < 3 * same[1]  # unbiased: centred on 0 for one distribution
    assert shifted[0] > 0 and shifted[0] > 3 * shifted[1]
    assert fid.kernel_distance(a[:1000], a[1000:], subsets=50, subset_size=200) == same  # deterministic for a seed
    assert fid.kernel_distance(a[:1000], a[1000:], subsets=50, subset_size=200, seed=1) != same


def test_kid_subsets_are_without_replacement_and_capped():
    pairs = list(fid.kid_subsets(30, 12, subsets=5, subset_size=1000, seed=0))
    assert len(pairs) == 5
    for i, j in pairs:
        assert len(i) == len(j) == 12 and len(set(i)) == 12 and len(set(j)) == 12
        assert i.max() < 30 and j.max() < 12
    with pytest.raises(fid.UserError, match="at least 2 images"):
        fid.kernel_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(fid.UserError, match="different dimensions"):
        fid.kernel_distance(np.zeros((5, 4)), np.zeros((5, 3)))


# -- the reservoir -----------------------------------------------------------------------------------

def _stream(n: int, batch: int, capacity: int, seed: int = 0) -> fid.FeatureStats:
    st = fid.FeatureStats(2, capacity=capacity, seed=seed)
    for k in range(0, n, batch):
        idx = np.arange(k, min(k + batch, n), dtype=np.float64)
        st.add(np.stack([idx, -idx], 1))
    return st


def test_reservoir_keeps_everything_below_capacity():
    st = _stream(70, 16, capacity=100)
    assert st.rows.shape == (70, 2) and st.rows.dtype == np.float32
    assert np.array_equal(st.rows[:, 0], np.arange(70))
    assert fid.FeatureStats(2).rows.shape == (0, 2)


def test_reservoir_capacity_determinism_and_batching():
    st = _stream(10_000, 37, capacity=100)
    kept = st.rows[:, 0]
    assert st.n == 10_000 and st.rows.shape == (100, 2)
    assert len(np.unique(kept)) == 100 and np.array_equal(st.rows[:, 1], -kept)  # whole rows, no repeats
    assert abs(kept.mean() - 4999.5) < 4 * 2887 / np.sqrt(100)  # a uniform sample: mean index near n / 2
    assert np.array_equal(_stream(10_000, 37, capacity=100).rows, st.rows)  # deterministic
    assert np.array_equal(_stream(10_000, 1000, capacity=100).rows, st.rows)  # whatever the batch size
    assert not np.array_equal(_stream(10_000, 37, capacity=100, seed=1).rows, st.rows)
    mu, sigma = st.result()  # the FID statistics still see every row
    assert mu[0] == pytest.approx(4999.5)


def test_reservoir_keeps_every_row_with_equal_probability():
    """Algorithm R: over many seeds, the first rows (kept at first, then displaced) and the last rows (offered once,
    at probability capacity / n) are each kept with probability capacity / n."""
    n, capacity, seeds = 1000, 100, 300
    counts = np.zeros(n)
    for seed in range(seeds):
        counts[_stream(n, 64, capacity, seed).rows[:, 0].astype(int)] += 1
    expected = seeds * 100 * capacity / n  # per block of 100 rows: 3,000, binomial sd about 52
    for block in (counts[:100], counts[450:550], counts[-100:]):
        assert abs(block.sum() - expected) < 6 * np.sqrt(expected)


# -- statistics files and the cache ----------------------------------------------------------------

class FakeInception(torch.nn.Module):
    """Stands in for the Inception where only the plumbing is tested: 64 features from channel means."""

    calls = 0

    def forward(self, x):
        FakeInception.calls += 1
        return [x.mean((2, 3), keepdim=True).repeat(1, 22, 1, 1)[:, :64] + torch.linspace(0, 1, 64)[None, :, None, None]]


def _images(folder, n, scale, seed):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((8, 8, 3)) * 255 * scale).astype("uint8")).save(folder / f"{i:03d}.png")
    return folder


def test_stats_of_caches_features_and_recomputes_old_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "cache"))
    src = _images(tmp_path / "a", 12, 1.0, 0)
    opts = dict(dims=64, device="cpu", workers=0, batch_size=5)
    FakeInception.calls = 0
    mu, sigma, n, feats = fid.stats_of(str(src), FakeInception(), **opts)
    assert n == 12 and feats.shape == (12, 64) and FakeInception.calls == 3
    assert np.allclose(feats.mean(0), mu, atol=1e-6)
    [cached] = (tmp_path / "cache" / "fid").glob("*.npz")
    again = fid.stats_of(str(src), FakeInception(), **opts)
    assert FakeInception.calls == 3 and np.array_equal(again[3], feats)  # from the cache
    fid.save_stats(cached, mu, sigma, n)  # as a cache entry written before KID: no feats
    assert "feats" not in np.load(cached)
    again = fid.stats_of(str(src), FakeInception(), **opts)
    assert FakeInception.calls == 6 and np.array_equal(again[3], feats)  # a miss: computed and cached again
    assert "feats" in np.load(cached)
    # A user's .npz: with feats, KID; with mu/sigma only (pytorch-fid's), None.
    fid.save_stats(tmp_path / "with.npz", mu, sigma, n, feats)
    assert np.array_equal(fid.stats_of(str(tmp_path / "with.npz"), None, dims=64, device="cpu")[3], feats)
    np.savez(tmp_path / "bare.npz", mu=mu, sigma=sigma)
    assert fid.stats_of(str(tmp_path / "bare.npz"), None, dims=64, device="cpu")[2:] == (-1, None)


# -- bdm fid ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--kid-subsets", "0"], "--kid-subsets must be in 1.."),
    (["--kid-subset-size", "1"], "--kid-subset-size must be at least 2"),
])
def test_fid_cli_rejects_bad_kid_options(tmp_path, args, message):
    r = invoke("fid", tmp_path, tmp_path, *args)
    assert r.exit_code == 2 and "Error:" in r.output and message in r.output and "Traceback" not in r.output


def test_fid_cli_prints_kid(tmp_path, monkeypatch):
    weights = shared_file("fid/pt_inception-2015-12-05.pth")
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "cache"))
    a, b = _images(tmp_path / "a", 20, 1.0, 0), _images(tmp_path / "b", 16, 0.4, 1)
    common = ["--dims", 64, "--inception-weights", weights, "--device", "cpu", "--workers", 0]
    r = invoke("fid", a, b, *common, "--kid-subsets", 20, "--kid-subset-size", 10, "--save-stats", tmp_path / "a.npz")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    kid_line = lines[lines.index(next(x for x in lines if x.startswith("FID:"))) + 1]
    assert kid_line.startswith("KID:") and "over 20 subsets of 10 images" in kid_line
    kid, fid_value = value(r.output, "KID"), value(r.output, "FID")
    assert kid > 0 and fid_value > 0
    # The saved features give the same KID without the images; the subset size is capped at the smaller set.
    r = invoke("fid", tmp_path / "a.npz", b, *common, "--kid-subsets", 20, "--kid-subset-size", 10)
    assert r.exit_code == 0 and value(r.output, "KID") == kid and value(r.output, "FID") == fid_value
    r = invoke("fid", tmp_path / "a.npz", b, *common)
    assert r.exit_code == 0 and "over 100 subsets of 16 images" in r.output
    # Statistics without features (pytorch-fid's .npz): FID as before, and a note instead of KID.
    with np.load(tmp_path / "a.npz") as f:
        np.savez(tmp_path / "bare.npz", mu=f["mu"], sigma=f["sigma"])
    r = invoke("fid", tmp_path / "bare.npz", b, *common)
    assert r.exit_code == 0, r.output
    assert value(r.output, "FID") == fid_value and "KID:" not in r.output
    assert "Note: KID skipped: the first input has only mu/sigma (.npz); KID needs the Inception features" in r.output
    with np.load(tmp_path / "a.npz") as f:
        # no n: one feature row for 20 images is refused (the rows are every image's, up to 10,000, and bdm writes n)
        np.savez(tmp_path / "one.npz", mu=f["mu"], sigma=f["sigma"], feats=f["feats"][:1])
    r = invoke("fid", tmp_path / "a.npz", tmp_path / "one.npz", *common)
    assert r.exit_code == 1 and "1 feature rows for n = unknown images" in r.output, r.output

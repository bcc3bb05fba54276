import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bdm_cli import fid
from bdm_cli.cli import app
from bdm_cli.config import load_config
from bdm_cli.engine import dct2
from bdm_cli.generate import Run, sample_batches
from bdm_cli.train import train

from .conftest import shared_file
from .test_sampling import SPEC, oracle

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def value(output: str, name: str) -> float:
    """The number after ``FID:`` or ``KID:`` (the KID line follows the FID line)."""
    return float(output.split(f"{name}:")[1].split()[0])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    train(load_config("tiny", ["train.steps=3"]), run)
    return run


def test_sample_reproducible_across_batch_sizes(tiny_run, tmp_path):
    for bs in (1, 3, 8):
        r = invoke("sample", "--run", tiny_run, "--n", 5, "--batch-size", bs, "--out-dir", tmp_path / f"b{bs}", "--seed", 7)
        assert r.exit_code == 0, r.output
    for i in range(5):
        imgs = [np.asarray(Image.open(tmp_path / f"b{bs}" / f"{i:06d}.png")) for bs in (1, 3, 8)]
        assert np.array_equal(imgs[0], imgs[1]) and np.array_equal(imgs[0], imgs[2])
    r = invoke("sample", "--run", tiny_run, "--n", 5, "--out-dir", tmp_path / "other", "--seed", 8)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "other" / "000000.png")), np.asarray(Image.open(tmp_path / "b1" / "000000.png")))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "heun"])
def test_sample_grid_and_trajectory(tiny_run, tmp_path, sampler):
    r = invoke("sample", "--run", tiny_run, "--n", 9, "--out", tmp_path / "g.png", "--sampler", sampler, "--steps", 4,
               "--trajectory", tmp_path / "t.png")
    assert r.exit_code == 0, r.output
    w, h = Image.open(tmp_path / "g.png").size
    assert w == h == 3 * (8 + 2) + 2  # nrow = sqrt(9)
    assert Image.open(tmp_path / "t.png").size[1] == 8 * (8 + 2) + 2  # 8 samples, one row each


def test_sample_as_written_with_default_run(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    for f in ("checkpoint.pt", "config.yaml"):
        (tmp_path / "runs" / "tiny" / f).write_bytes((tiny_run / f).read_bytes())
    r = invoke("sample", "--n", 64, "--out", "grid.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "--n must be positive"),
    (["--steps", "0"], "--steps"),
    (["--sampler", "euler"], "--sampler"),
    (["--run", "/nonexistent-bdm-run"], "not found"),
])
def test_sample_errors(tiny_run, args, message):
    if "--run" not in args:
        args = ["--run", str(tiny_run)] + args
    r = invoke("sample", *args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_sample_rejects_non_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_text("not a checkpoint")
    r = invoke("sample", "--checkpoint", bad)
    assert r.exit_code == 1 and "not a readable checkpoint" in r.output


def test_oracle_through_the_sampling_path():
    """sample_batches (the CLI's path: per-sample generators, batching) on the exact Gaussian oracle."""
    cfg = load_config("tiny", ["diffusion.sigma_blur_max=20", "model.precondition=false", "sample.sampler=ancestral"])
    schedule = cfg.diffusion
    run = Run(cfg, oracle(schedule), None, 0, torch.device("cpu"))
    x = torch.cat(list(sample_batches(run, 2000, batch_size=1000, steps=1000, clamp=False)))
    err = (dct2(x).std(0)[0] / SPEC - 1).abs()
    assert err.median() < 0.03 and err.max() < 0.1, (err.median(), err.max())
    fast = torch.cat(list(sample_batches(run, 2000, batch_size=1000, steps=50, sampler="heun", clamp=False)))
    assert (dct2(fast).std(0)[0] / SPEC - 1).abs().median() < 0.05


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    a[-2:] = 0  # rank-deficient, as with fewer images than dims
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)  # sqrt of ~1e-15 eigenvalues
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)
    # Non-commuting covariances: against the textbook sqrtm formula.
    import scipy.linalg

    c1, c2 = np.cov(rng.normal(size=(5, 50))), np.cov(rng.normal(size=(5, 50)) * 2)
    ref = np.trace(c1) + np.trace(c2) - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real)
    assert fid.frechet_distance(np.zeros(5), c1, np.zeros(5), c2) == pytest.approx(ref, rel=1e-8)


def test_feature_stats_streaming_and_small_n():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(100, 4))
    st = fid.FeatureStats(4)
    st.add(feats[:30]), st.add(feats[30:])
    mu, sigma = st.result()
    assert np.allclose(mu, feats.mean(0)) and np.allclose(sigma, np.cov(feats, rowvar=False))
    one = fid.FeatureStats(4)
    one.add(feats[:1])
    with pytest.raises(fid.UserError, match="at least 2"):
        one.result()


def test_fid_errors_without_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import pytorch_fid.inception as pfi

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(pfi, "load_state_dict_from_url", offline)
    r = invoke("fid", tmp_path, tmp_path)
    assert r.exit_code == 1 and "--inception-weights" in r.output and fid.WEIGHTS_ENV in r.output
    r = invoke("fid", tmp_path)
    assert r.exit_code == 2 and "two inputs" in r.output
    r = invoke("fid", tmp_path, tmp_path, "--inception-weights", tmp_path / "missing.pth")
    assert r.exit_code == 1 and "not found" in r.output


def _cifar_subset(tmp_path, n=200):
    zpath = shared_file("data/cifar10-jpeg.zip")
    dirs = []
    with zipfile.ZipFile(zpath) as z:
        names = sorted(x for x in z.namelist() if x.endswith(".jpg"))
        for split, step in (("train/", 250), ("test/", 50)):
            d = tmp_path / split.strip("/")
            d.mkdir()
            for i, name in enumerate([x for x in names if x.startswith(split)][::step][:n]):
                (d / f"{i:04d}.jpg").write_bytes(z.read(name))
            dirs.append(d)
    return dirs


@pytest.mark.slow
def test_fid_equals_pytorch_fid_cli(tmp_path, monkeypatch):
    weights = shared_file("fid/pt_inception-2015-12-05.pth")
    a, b = _cifar_subset(tmp_path)
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "pt_inception-2015-12-05-6726825d.pth").symlink_to(weights)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, "-m", "pytorch_fid", str(a), str(b), "--device", "cpu", "--batch-size", "100"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = float(proc.stdout.split("FID:")[1])  # pytorch-fid prints nothing after it
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "cache"))
    r = invoke("fid", a, b, "--inception-weights", weights, "--device", "cpu", "--save-stats", tmp_path / "a.npz")
    assert r.exit_code == 0, r.output
    ours, kid = value(r.output, "FID"), value(r.output, "KID")
    assert abs(ours - theirs) < 1e-3, (ours, theirs)
    # 200 images each, under the subset size: every subset would be both whole sets, so one estimate and no "±"
    assert "rank-deficient" in r.output and "KID: " in r.output and "the whole sets, 200 images each" in r.output
    assert "±" not in r.output
    # The saved statistics (with the KID features) and the cache give the same numbers without the images.
    r = invoke("fid", tmp_path / "a.npz", b, "--inception-weights", weights, "--device", "cpu")
    assert r.exit_code == 0 and abs(value(r.output, "FID") - ours) < 1e-9 and value(r.output, "KID") == kid
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 2


def test_fid_of_a_run_against_a_folder(tiny_run, tmp_path, monkeypatch):
    weights = shared_file("fid/pt_inception-2015-12-05.pth")
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "cache"))
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((8 + i % 3, 8, 3)) * 255).astype("uint8")).save(ref / f"{i}.png")  # mixed sizes
    r = invoke("fid", "--run", tiny_run, "--ref", ref, "--n", 6, "--steps", 3, "--dims", 64, "--inception-weights", weights,
               "--out-dir", tmp_path / "samples")
    assert r.exit_code == 0, r.output
    assert value(r.output, "FID") > 0 and len(list((tmp_path / "samples").glob("*.png"))) == 6
    assert "over 100 subsets of 6 images" in r.output  # the samples' features give KID too
    # Quantised exactly as the PNGs: scoring the written PNGs gives the same numbers.
    r2 = invoke("fid", tmp_path / "samples", ref, "--dims", 64, "--inception-weights", weights, "--no-cache")
    assert abs(value(r2.output, "FID") - value(r.output, "FID")) < 1e-6
    assert abs(value(r2.output, "KID") - value(r.output, "KID")) < 1e-6

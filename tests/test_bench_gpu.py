"""bench/gpu.py --smoke: the whole device check on the CPU at the tiny preset, so it cannot rot between the
sessions that are lent a GPU (issue #12). Then --score on its samples (random Inception weights, a stand-in
reference) and the docs section it writes."""

import importlib.util
import json
import subprocess
import sys

import numpy as np

from .conftest import ROOT

BENCH_PY = ROOT / ".bench-venv" / "bin" / "python"  # make test builds it: the peers live there, never in .venv


def test_gpu_check_smoke_runs_every_part(tmp_path):
    python = str(BENCH_PY) if BENCH_PY.exists() else sys.executable
    out = tmp_path / "out"
    p = subprocess.run([python, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for part in ("matmul", "throughput", "train", "speeds", "cuda_tests"):
        assert "error" not in report[part], (part, report[part])
    rows = report["throughput"]["variants"]
    assert rows["bdm"]["images_per_s"] > 0 and rows["bdm"]["flops_per_step"] > 0
    peers = subprocess.run([python, "-c", "import diffusers, denoising_diffusion_pytorch"], capture_output=True).returncode == 0
    for name in ("diffusers UNet2DModel", "denoising-diffusion-pytorch Unet"):
        assert ("images_per_s" in rows[name]) if peers else ("ModuleNotFoundError" in rows[name]["error"]), rows[name]
    train = report["train"]
    assert train["steps"] >= 2 and np.isfinite(train["loss"]) and train["log"], train
    images = np.concatenate([np.load(out / name)["images"] for name in train["parts"]])
    assert images.shape == (24, 8, 8, 3) and images.dtype == np.uint8
    assert "passed" in report["cuda_tests"]["summary"] or "skipped" in report["cuda_tests"]["summary"]

    # --tune: the profile and the settings rows.
    tuned = tmp_path / "tuned"
    p = subprocess.run([python, str(ROOT / "bench" / "gpu.py"), "--smoke", "--tune", "--skip-tests", "--out", str(tuned)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tuned / "report.json").read_text())["tune"]["rows"]
    assert all(r["images_per_s"] > 0 for r in rows.values()), rows

    # Back "here": the FID of the returned samples and the docs section.
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    p = subprocess.run([python, str(ROOT / "bench" / "gpu.py"), "--score", str(out), "--reference", str(ref),
                        "--inception-weights", "random", "--docs", str(docs), "--tuned", str(tuned)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    page = docs.read_text()
    assert "kept" in page and page.count("<!-- gpu: written by bench/gpu.py -->") == 1
    assert "FID **" in page and "| bdm |" in page and "| batch x2 |" in page
    assert np.isfinite(json.loads((out / "report.json").read_text())["train"]["fid"])


def test_gpu_check_needs_no_peer_in_the_project_env():
    """bdm itself never imports the peers (they are only timed by bench/gpu.py)."""
    assert importlib.util.find_spec("bdm_cli") is not None
    src = "\n".join(p.read_text() for p in (ROOT / "bdm_cli").rglob("*.py"))
    assert "import diffusers" not in src and "denoising_diffusion_pytorch" not in src

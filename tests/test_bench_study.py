"""bench/study.py's report (item 8 and 9): it is written after an hour or two of training, so a slip in it must show
up here; its section of docs/benchmarks.md is replaced in place, and bench/run.py keeps it."""

import sys

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
study = pytest.importorskip("study")


def metrics(fid: float, kid: float, **ratios) -> dict:
    base = {"saturated": 1.0, "std": 1.0, "dct_low": 1.0, "dct_high": 1.0, "dct_worst": 1.1, "mean": -0.38,
            "data_mean": -0.38}
    return {"fid": fid, "kid": kid, "kid_std": kid / 5, "n": 2000, "sample_s": 60.0, "score_s": 200.0, **base, **ratios}


def result(peer_kid: float, demo_saturated: float = 0.97) -> dict:
    settings = {"steps": 2000, "batch_size": 64, "lr": 1e-3, "warmup": 100, "checkpoints": 2, "n": 2000, "curve_n": 250,
                "sampler": "ancestral", "sample_steps": 50, "peer_sample_steps": 50, "peer_dim": 20, "kid_subsets": 100,
                "kid_subset_size": 1000, "sweep_n": 500, "smoke": False}

    def row(fid, kid):
        return {"final": metrics(fid, kid), "curve": [(1000, metrics(fid * 2, kid * 2)), (2000, metrics(fid, kid))],
                "loss": [(25, 0.1), (2000, 0.05)], "train_min": 6.5, "params": 367129}

    rows = {"bdm, blur 0 (sin2)": row(8.0, 0.0015), "bdm, blur 2 (sin2)": row(9.0, 0.0012),
            "bdm, blur 2 (linear)": row(10.0, 0.002), study.PEER: row(12.0, peer_kid)}
    sweep = {s: {e: metrics(10.0 + e / 100, 0.002) for e in (4 if s == "heun" else 5, 10, 20, 50)} for s in study.SWEEP_SAMPLERS}
    sweep["ancestral"][1000] = metrics(9.5, 0.0015)
    demo = {**metrics(10.0, 0.002, saturated=demo_saturated), "sampler": "ancestral", "steps": 100, "train_steps": 1800,
            "sigma_blur_max": 2.0}
    return {"settings": settings, "rows": rows, "floor": {**metrics(6.0, 0.0001), "n": 899, "n_ref": 898}, "best_blur": "bdm, blur 2 (sin2)",
            "machine": "a test machine", "sweep": {"model": "bdm, blur 2 (sin2)", "n": 500, "table": sweep}, "demo": demo}


def test_report_rows_floor_and_comparisons():
    text = study.report(result(peer_kid=0.003), "python bench/study.py")
    assert text.startswith(study.MARKERS[0]) and text.endswith(study.MARKERS[1])
    for name in ("bdm, blur 0 (sin2)", "bdm, blur 2 (linear)", study.PEER, "floor: two halves of the digits (899 against 898)"):
        assert f"| {name} |" in text, name
    assert "Best bdm row by KID: bdm, blur 2 (sin2)" in text and "bdm is at least as good" in text
    assert "unipc at 20 NFE: FID 10.20 against ancestral at 1,000 steps 9.50: 1.07x (goal <= 1.10: met)" in text
    assert "FID within 2x of the floor: met" in text


def test_report_says_when_bdm_is_behind_and_the_demo_misses():
    text = study.report(result(peer_kid=0.0002, demo_saturated=0.7), "python bench/study.py")
    assert "bdm is behind by 1.00e-3 in KID" in text
    assert "FID within 2x of the floor: not met" in text


def test_section_is_replaced_in_place_and_kept_by_run(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n## 1. speed\n\ntext\n")
    study.write_section(study.MARKERS[0] + "\nfirst\n" + study.MARKERS[1], page)
    study.write_section(study.MARKERS[0] + "\nsecond\n" + study.MARKERS[1], page)
    text = page.read_text()
    assert "## 1. speed" in text and "second" in text and "first" not in text and text.count(study.MARKERS[0]) == 1


def test_training_in_milestones_resumes_with_the_runs_own_config(tmp_path):
    """The study trains each row milestone by milestone with `bdm train --resume`; bdm refuses --preset with --resume
    (round seven), which broke the study's second milestone until it was rerun."""
    import argparse

    p = argparse.ArgumentParser()
    study.add_arguments(p)
    args = p.parse_args(["--smoke", "--steps", "2", "--checkpoints", "2", "--batch-size", "8", "--warmup", "1"])
    run = study.train_bdm("bdm, blur 1 (sin2)", 1.0, "sin2", args, tmp_path)
    assert (run / "step_000001.pt").is_file() and (run / "step_000002.pt").is_file()

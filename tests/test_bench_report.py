"""bench/run.py's report: it runs after hours of measurement, so a formatting slip must show up here, not there;
and it must say when a goal is not met, and why."""

import json
import sys

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
run = pytest.importorskip("run")  # bench/run.py (imports bench/quality.py beside it)
quality = sys.modules["quality"]


def results(*, ancestral_1000: float, best: float, n: int = 50, train_steps: int = 120, dropout0: float = 30.0) -> dict:
    ips = {"bdm": 27.5, "denoising-diffusion-pytorch": 17.6, "diffusers": 28.4, "bdm, dropout 0": dropout0,
           "bdm, no preconditioning": 28.0}
    curve = [(10 * i, 0.1 / i) for i in range(1, 13)]
    q = {"settings": {"train_steps": train_steps, "batch_size": 64, "lr": 2e-4, "warmup": 20, "ema_decay": 0.95, "n": n,
                      "steps": [10, 25], "ancestral_steps": [10, 1000], "best_nfe": 50, "peer": True, "bf16": False},
         "fid_vs_nfe": {"ancestral, uniform grid": [(10, 300.0), (1000, ancestral_1000)],
                        "ddim, logsnr grid": [(10, 320.0), (25, best)], "heun, logsnr grid": [(19, 330.0), (49, best + 5)]},
         "best": {"sampler": "ddim", "grid": "logsnr", "steps": 25, "nfe": 25, "fid": best},
         "ancestral_1000": ancestral_1000,
         "blur_table": {"blur 20 (sin2)": best, "no blur": 250.0, quality.PEER: 280.0},
         "losses": {"blur 20 (sin2)": curve, "no blur": curve, quality.PEER: curve},
         "train_minutes": {"blur 20 (sin2)": 9.2, "no blur": 9.0, quality.PEER: None}}
    return {"blur": {"batch": 32, "params": 4.44e6, "blur 20": 1.19, "no blur": 1.22, "ratio": 0.98},
            "sampler": {"batch": 16, "rows": {
                "ancestral": {"steps": 100, "calls": 100, "repeat": 1, "sampler": 18.5, "network alone": 18.3, "outside": 0.011,
                              "noise": 0.02},
                "unipc": {"steps": 20, "calls": 21, "repeat": 5, "sampler": 19.5, "network alone": 19.3, "outside": 0.01,
                          "noise": 0.02}}},
            "peers": {"batch": 32, "images_per_s": ips, "flops_per_s": 1.6e11, "matmul_flops_per_s": 1.9e11,
                      "params": {"bdm": 4.44e6, "denoising-diffusion-pytorch": 4.64e6, "diffusers": 4.44e6}},
            "fid": {"n": 250, "bdm fid": 52.0, "pytorch_fid": 80.0, "speedup": 1.54, "fid_bdm": 115.3, "fid_pytorch_fid": 115.3},
            "memory": {"train_mb": 2315, "sample_mb": 1066, "sample_n": 1000}, "quality": q}


def test_report_states_unmet_goals_and_their_causes():
    text = run.report(results(ancestral_1000=200.0, best=260.0), quick=True)
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 7.", "## 5.", "## 6."):
        assert heading in text
    assert "1.30x (goal <= 1.10: not met)" in text and "Why not" in text
    assert "0.97x (float32)" in text and "the cause, measured by the diagnostics: dropout, which" in text  # 30.0 / 28.4 >= 1
    assert text.count("Smaller than the issue asks") == 2  # n and training length, each with its cause
    assert "| denoising-diffusion-pytorch | 280.0 |" in text and "not recorded" in text and "| 9 min |" in text
    assert "bf16 images/s" not in text  # no bf16 row measured: no empty column


def test_report_at_the_issue_scale_claims_no_gap():
    text = run.report(results(ancestral_1000=200.0, best=210.0, n=2000, train_steps=2500, dropout0=20.0), quick=False)
    assert "1.05x (goal <= 1.10: met)" in text and "Why not" not in text
    assert "Smaller than the issue asks" not in text
    assert "none of the diagnostics accounts for it: the cause is not established" in text


def test_training_minutes_from_the_metrics_log(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "time": 1000.0 + 3.0 * s} for s in (10, 20, 30, 40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve, minutes = quality.bdm_log(tmp_path)
    assert curve == [(10, 0.1), (20, 0.05), (30, 1 / 30), (40, 0.025)]
    assert minutes == pytest.approx(40 * 3.0 / 60)  # 3 s a step over all 40 steps, the first 10 included


def test_ema_horizon_follows_the_training_length():
    assert quality.ema_decay_for(2500) == pytest.approx(0.996)
    assert quality.ema_decay_for(120) == pytest.approx(1 - 10 / 120)
    assert quality.ema_decay_for(20) == 0.9  # a horizon of at least 10 steps
    assert quality.ema_decay_for(10**7) == 0.9999


def test_sampler_overhead_within_the_timing_noise_is_not_a_verdict():
    r = results(ancestral_1000=200.0, best=210.0)
    r["sampler"]["rows"]["unipc"] |= {"outside": 0.045, "noise": 0.09}
    page = run.report(r, quick=True)
    assert "| unipc | 20 | 21 |" in page and "| 4.5% | 9.0% |" in page
    assert "For unipc the share is within the timing noise" in page
    r["sampler"]["rows"]["unipc"] |= {"outside": 0.011, "noise": 0.02}
    assert "within the timing noise" not in run.report(r, quick=True)


def test_items_rerun_replaces_only_their_sections_and_keeps_the_marked_ones():
    """``bench/run.py --items 2`` rewrites item 2 in the page and leaves the rest, items 8-9 and the GPU section as
    they were; a full run keeps the marked sections too (they come from bench/study.py and bench/gpu.py)."""
    r = results(ancestral_1000=200.0, best=210.0)
    study_part = f"{run.study.MARKERS[0]}\n## 8. study\ntext 8\n{run.study.MARKERS[1]}"
    gpu_part = f"{run.KEPT[1][0]}\n## GPU\ngpu text\n{run.KEPT[1][1]}"
    old = run.report(r, quick=True) + "\n" + study_part + "\n" + gpu_part + "\n"
    r["sampler"]["rows"]["unipc"] |= {"steps": 7, "calls": 8}
    page = run.replace_items(old, {"2": run.sampler_lines(r)}, "Re-measured today.")
    assert "| unipc | 7 | 8 |" in page and "| unipc | 20 | 21 |" not in page and "Re-measured today." in page
    assert page.count("## 2. Sampler overhead") == 1 and page.index("## 2.") < page.index("## 3.")
    assert page.split("## 3.", 1)[1].split(run.study.MARKERS[0])[0] == old.split("## 3.", 1)[1].split(run.study.MARKERS[0])[0]
    assert study_part in page and gpu_part in page
    five = run.replace_items(old, {"5": ["## 5. new five", "", "## 6. new six", ""]}, "R.")
    assert [h for h in five.splitlines() if h.startswith("## 5") or h.startswith("## 6")] == ["## 5. new five", "## 6. new six"]
    full = run.report(r, quick=True) + run.kept_sections(old)
    assert study_part in full and gpu_part in full

import csv

import pytest
from PIL import Image
from typer.testing import CliRunner

from bdm_cli import __version__
from bdm_cli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version_and_presets():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = run("presets")
    assert r.exit_code == 0
    for name in ("cifar10", "ddpm_cifar10", "cifar10_cpu", "digits", "tiny", "lsun_churches", "lsun_churches64"):
        assert name in r.output


def test_blur_preview_as_written(image_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("blur-preview", image_file, "--t", "0.5")
    assert r.exit_code == 0, r.output
    img = Image.open(tmp_path / "blur_preview.png")
    assert img.size == (2 * (128 + 4) + 4, 18 + 2 * (128 + 4) + 4)  # original + one t, two rows
    assert "0.5" in r.output and "blur_preview.png" in r.output


def test_blur_preview_options(image_file, tmp_path):
    out = tmp_path / "p.png"
    r = run("blur-preview", image_file, "--t", "0,0.25", "--t", "1", "--size", "16", "--sigma-blur-max", "8",
            "--blur", "linear", "--no-noise", "--out", out)
    assert r.exit_code == 0, r.output
    w, h = Image.open(out).size
    # 4 columns (original + 3 t), one row of 16 px tiles scaled to 128 px.
    assert w == 4 * (128 + 4) + 4 and h == 18 + 128 + 8


def test_blur_preview_default_strip_has_two_rows(image_file, tmp_path):
    out = tmp_path / "p.png"
    assert run("blur-preview", image_file, "-o", out).exit_code == 0
    w, h = Image.open(out).size
    assert w == 12 * (128 + 4) + 4 and h == 18 + 2 * (128 + 4) + 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.jpg"], "not found"),
        (["{text}"], "cannot read"),
        (["{img}", "--t", "1.5"], "[0, 1]"),
        (["{img}", "--t", "-0.1"], "[0, 1]"),
        (["{img}", "--t", "abc"], "number"),
        (["{img}", "--preset", "cifar100"], "unknown preset"),
        (["{img}", "--blur", "box"], "diffusion.blur"),
        (["{img}", "--out", "/nonexistent/dir/x.png"], "does not exist"),
    ],
)
def test_blur_preview_errors(args, message, image_file, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    args = [a.format(img=image_file, text=text) for a in args]
    r = run("blur-preview", *args)
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output


def test_unknown_preset_suggests(image_file):
    r = run("blur-preview", image_file, "--preset", "cifar")
    assert r.exit_code == 2 and "did you mean 'cifar10'" in r.output


def test_schedule_plot(tmp_path):
    out, table = tmp_path / "s.png", tmp_path / "s.csv"
    r = run("schedule-plot", "--preset", "cifar10", "--out", out, "--compare", "0,10,20", "--csv", table)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size[0] > 1000
    rows = list(csv.DictReader(table.open()))
    assert {float(r["sigma_blur_max"]) for r in rows} == {0.0, 10.0, 20.0}
    no_blur = [r for r in rows if float(r["sigma_blur_max"]) == 0]
    assert all(r["alpha_highest"] == r["alpha_lowest"] for r in no_blur)
    blur = [r for r in rows if float(r["sigma_blur_max"]) == 20 and float(r["t"]) == 0.5][0]
    assert float(blur["alpha_highest"]) < 0.01 < float(blur["alpha_lowest"])


def test_schedule_plot_svg_default_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("schedule-plot", "--format", "svg")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "schedule.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("args", [["--format", "gif"], ["--compare", "a,b"], ["--preset", "nope"], ["--compare", "-1"]])
def test_schedule_plot_errors(args):
    r = run("schedule-plot", *args)
    assert r.exit_code != 0 and "Traceback" not in r.output and "Error" in r.output

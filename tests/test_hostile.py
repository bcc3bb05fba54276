"""Hostile input, round two (issue #13): one regression test per class of failure, then a seeded fuzz test over
config values, image bytes, zip members and checkpoint contents. Every case asserts the README's promises: exit 1 or
2, exactly one ``Error:`` line, no traceback, nothing written outside the intended place, nothing already written
changed."""

import os
import random
import re
import signal
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdm_cli.checkpoint import load_checkpoint
from bdm_cli.io import check_writable

from .conftest import shared_file
from .test_reliability import _images, invoke, one_line_error


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile") / "run"
    r = invoke("train", "--preset", "tiny", "--out", run, "--steps", 2)
    assert r.exit_code == 0, r.output
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run's files (not its samples/), to damage without touching the shared one."""
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- outputs: only regular files, never a device, a directory or a link's target -------------------------------------

def test_outputs_refuse_links_directories_and_devices(tmp_path, image_file):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    folder = tmp_path / "dir.png"
    folder.mkdir()
    for out in (link, fifo, folder):
        msg = one_line_error(invoke("blur-preview", image_file, "--out", out, "--preset", "tiny"), 1)
        assert str(out) in msg and ".tmp" not in msg
    assert target.read_text() == "keep me" and link.is_symlink() and folder.is_dir()
    with pytest.raises(Exception, match="not a regular file"):
        check_writable(Path("/dev/null"))  # what replaced /dev/null for a root user before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_format_follows_the_extension_or_is_refused(good_run, tmp_path):
    r = invoke("sample", "--run", good_run, "--n", 2, "--steps", 2, "--out", tmp_path / "grid.jpg")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--steps", 2, "--out", tmp_path / "grid.foo"), 2)
    assert "extension" in msg and not (tmp_path / "grid.foo").exists()
    msg = one_line_error(invoke("schedule-plot", "--preset", "tiny", "--out", tmp_path / "s.png", "--format", "svg"), 2)
    assert ".svg" in msg


def test_disk_full_inside_torch_save_is_one_line_and_keeps_the_checkpoint(good_run, tmp_path, monkeypatch):
    import bdm_cli.checkpoint as ck

    run = _copy_run(good_run, tmp_path / "run")
    before = (run / "checkpoint.pt").read_bytes()

    def full(obj, f, *a, **k):  # what torch's zip writer raises on a 64 KB file system
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(ck.torch, "save", full)
    msg = one_line_error(invoke("train", "--resume", run, "--steps", 3), 1)
    assert "(the disk is full); the previous checkpoint is kept" in msg
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_stale_temp_files_of_a_killed_run_are_cleaned(good_run, tmp_path):
    run = _copy_run(good_run, tmp_path / "run")
    (run / ".checkpoint.pt.abc123.bdm.tmp").write_bytes(b"half a checkpoint")
    assert invoke("train", "--resume", run, "--steps", 3).exit_code == 0
    assert not list(run.glob(".*.tmp"))


# -- values: parsed for their field's type, checked once where they enter ---------------------------------------------

def test_data_is_a_name_not_yaml(tmp_path):
    for data in ("[2024] photos", "01", "{a: b}", "- x"):
        msg = one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--data", data))
        assert repr(data) in msg or data in msg, msg


@pytest.mark.parametrize("value,message", [
    ("train.lr=-1", "train.lr must be in (0, 1]"), ("model.dropout=2", "model.dropout"), ("model.num_heads=0", "num_heads"),
    ("model.num_heads=3", "must divide"), ("data.num_workers=-1", "num_workers"), ("train.ema_decay=nan", "ema_decay"),
    ("train.ema_decay=.nan", "ema_decay"), ("diffusion.sigma_blur_max=.inf", "sigma_blur_max"), ("train.seed=-1", "seed"),
    ("train.seed=10000000000000000000", "seed"), ("train.device=tpu", "train.device"), ("model.channel_mult=[1,0]", "channel_mult"),
    ("train.steps=[1", "train.steps"), ("train.compile=maybe", "train.compile"), ("sample.n=0", "sample.n"),
])
def test_config_values_that_used_to_fail_later(tmp_path, value, message):
    msg = one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--set", value), 2)
    assert message in msg
    assert not (tmp_path / "r").exists()


def test_big_seeds_and_missing_devices(tmp_path, image_file):
    r = invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--steps", 1, "--seed", 10_000_000_000_000_000)
    assert r.exit_code == 0, r.output
    # beyond 2^63 - 1 a seed would alias a smaller one (round seven): refused, as train.seed is
    assert invoke("blur-preview", image_file, "--seed", 10**30, "--preset", "tiny", "--out", tmp_path / "b.png").exit_code == 2
    msg = one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "m", "--device", "mps"), 1)
    assert "mps" in msg


# -- files in: images, zips, statistics ------------------------------------------------------------------------------

def _zip_with(path: Path, tamper) -> Path:
    """A zip of 8 PNGs whose first member is tampered with (its raw bytes or header) by ``tamper(raw, info)``."""
    folder = _images(path.parent / (path.stem + "_src"), n=8, size=12)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.iterdir()):
            z.write(p, f"train/{p.name}")
    raw = bytearray(path.read_bytes())
    tamper(raw)
    path.write_bytes(bytes(raw))
    return path


def _corrupt_deflate(raw):
    start = 30 + struct.unpack("<H", raw[26:28])[0] + struct.unpack("<H", raw[28:30])[0]
    raw[start : start + 8] = b"\xff" * 8


def _encrypted_flag(raw):
    raw[6] |= 1  # local header
    cd = raw.find(b"PK\x01\x02")
    raw[cd + 8] |= 1  # central directory


def _compression_99(raw):
    raw[8:10] = struct.pack("<H", 99)
    cd = raw.find(b"PK\x01\x02")
    raw[cd + 10 : cd + 12] = struct.pack("<H", 99)


@pytest.mark.parametrize("tamper", [_corrupt_deflate, _encrypted_flag, _compression_99])
def test_damaged_zip_members_are_skipped(tmp_path, tamper):
    data = _zip_with(tmp_path / "data.zip", tamper)
    r = invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--data", data, "--steps", 1,
               "--set", "data.channels=3", "--set", "train.batch_size=4", "--set", "data.num_workers=0")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_declared_size_is_checked_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    # A valid 1x1 PNG whose header then says 15000 x 15000: Pillow reads the size without decoding.
    Image.new("RGB", (1, 1)).save(bomb)
    raw = bytearray(bomb.read_bytes())
    raw[16:24] = struct.pack(">II", 15000, 15000)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    bomb.write_bytes(bytes(raw))
    msg = one_line_error(invoke("blur-preview", bomb, "--preset", "tiny", "--out", tmp_path / "p.png"), 1)
    assert "15000 x 15000" in msg


def test_exif_orientation_is_applied(tmp_path):
    from bdm_cli.data import load_image

    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the white half ends up on top
    img.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "rotated.jpg", 8, 1)
    assert x[0, :2].mean() > 0.5 and x[0, -2:].mean() < -0.5, x[0]


@pytest.mark.parametrize("content", [b"", b"mu sigma", "objects", "shapes", "nan"])
def test_malformed_statistics_files(tmp_path, content):
    path = tmp_path / "stats.npz"
    if content == "objects":
        np.savez(path, mu=np.array([object()], dtype=object), sigma=np.zeros((2048, 2048)))
    elif content == "shapes":
        np.savez(path, mu=np.zeros(3), sigma=np.zeros((3, 4)))
    elif content == "nan":
        np.savez(path, mu=np.full(2048, np.nan), sigma=np.eye(2048))
    else:
        path.write_bytes(content)
    from bdm_cli.fid import read_stats
    from bdm_cli.errors import UserError

    with pytest.raises(UserError, match="not a .npz of FID statistics"):
        read_stats(path, 2048)


# -- checkpoints from elsewhere --------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    lambda s: s.update(config="a string"), lambda s: s.update(step="ten"), lambda s: s.update(step=-4),
    lambda s: s.update(model={"w": "not a tensor"}), lambda s: s.update(data_stats={"mean_u": torch.zeros(2)}),
    lambda s: s.update(data_stats=[1, 2]), lambda s: s.pop("rng"), lambda s: s.update(opt={"state": 1}),
    lambda s: s.update(config={**s["config"], "train": {"lr": "fast"}}),
])
def test_foreign_checkpoint_contents(good_run, tmp_path, change):
    state = load_checkpoint(good_run / "checkpoint.pt")
    change(state)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "checkpoint.pt")
    before = _snapshot(run)
    for args in (("sample", "--run", run, "--n", 2, "--steps", 2, "--out", tmp_path / "g.png"),
                 ("train", "--resume", run, "--steps", 4)):
        r = invoke(*args)
        if r.exit_code != 0:
            one_line_error(r)
    assert _snapshot(run) == before or "rng" not in state  # a resumable one may have continued


# -- messages that misled ---------------------------------------------------------------------------------------------

def test_train_never_writes_over_a_users_folder(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "notes.txt").write_text("mine\n")
    msg = one_line_error(invoke("train", "--preset", "tiny", "--out", mine, "--steps", 1), 2)
    assert "config.yaml" in msg or "notes.txt" in msg
    assert (mine / "config.yaml").read_text() == "my own config\n"


def test_resume_refuses_preset_and_out(good_run, tmp_path):
    msg = one_line_error(invoke("train", "--resume", good_run, "--preset", "digits"), 2)
    assert "--resume" in msg
    msg = one_line_error(invoke("train", "--resume", good_run, "--out", tmp_path / "elsewhere"), 2)
    assert "--out" in msg


def test_fid_counts_what_it_could_not_read_and_names_odd_files(tmp_path, monkeypatch):
    """Non-UTF-8 file names and unreadable files in a folder (the Inception is a random stand-in: only the reading is
    under test)."""
    import bdm_cli.fid as fid

    folder = _images(tmp_path / "a", n=4)
    (folder / "broken.png").write_bytes(b"not a png")
    odd = os.fsencode(str(folder)) + b"/caf\xe9.png"
    with open(odd, "wb") as f:
        f.write((folder / "0.png").read_bytes())
    real = fid.inception
    monkeypatch.setattr(fid, "inception", lambda dims=2048, weights=None, device="cpu": real(dims, "random", device))
    r = invoke("fid", folder, folder, "--no-cache", "--workers", 0)
    assert r.exit_code == 0, r.output
    assert "1 of its 6 images could not be read" in r.output


# -- the fuzz test -----------------------------------------------------------------------------------------------------

def _fuzz_cases(rng: random.Random, good_run: Path, tmp: Path):
    """(name, argv) pairs: random config values, mutated image bytes, zips and checkpoints."""
    from bdm_cli.config import Config
    from dataclasses import fields

    values = ["-1", "0", "1e400", ".nan", "-.inf", "[1, 2", "{}", "~", "", "abc", "9" * 30, "1.5", "true", "[[]]", "'", "\x00"]
    for i in range(14):
        section = rng.choice([f for f in fields(Config) if f.name != "preset"])
        key = rng.choice([f.name for f in fields(section.default_factory())])
        yield f"set {section.name}.{key}", ["train", "--preset", "tiny", "--out", tmp / f"c{i}", "--steps", 1,
                                            "--set", f"{section.name}.{key}={rng.choice(values)}"]
    png = (good_run / "samples").glob("*.png").__next__().read_bytes()
    for i in range(8):
        raw = bytearray(png)
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        path = tmp / f"img{i}.png"
        path.write_bytes(bytes(raw))
        yield f"image {i}", ["blur-preview", path, "--preset", "tiny", "--out", tmp / f"p{i}.png"]
    for i in range(5):
        path = tmp / f"z{i}.zip"
        _zip_with(path, lambda raw: [raw.__setitem__(rng.randrange(len(raw)), rng.randrange(256)) for _ in range(8)])
        yield f"zip {i}", ["train", "--preset", "tiny", "--out", tmp / f"zr{i}", "--steps", 1, "--data", path,
                           "--set", "data.num_workers=0", "--set", "train.batch_size=2"]
    state = load_checkpoint(good_run / "checkpoint.pt")
    junk = ["x", 3, -1, None, [1], {"a": 1}, torch.zeros(2), 1.5]
    for i in range(8):
        s = dict(state)
        key = rng.choice(["config", "step", "model", "ema", "data_stats", "opt", "rng", "format"])
        s[key] = rng.choice(junk)
        run = tmp / f"k{i}"
        run.mkdir()
        torch.save(s, run / "checkpoint.pt")
        yield f"checkpoint {key}={s[key]!r}", ["sample", "--run", run, "--n", 2, "--steps", 2, "--out", tmp / f"k{i}.png"]


def test_fuzz_hostile_inputs(good_run, tmp_path, monkeypatch):
    """Seeded, about a minute: every case either works or fails with exit 1/2 and one Error: line; nothing is
    written outside tmp_path and the trained run is untouched."""
    monkeypatch.chdir(tmp_path)
    protected = _snapshot(good_run)
    failures = []
    for name, argv in _fuzz_cases(random.Random(13), good_run, tmp_path):
        r = invoke(*argv)
        if r.exit_code == 0:
            continue
        errors = [line for line in r.output.splitlines() if line.startswith("Error")]
        if r.exit_code not in (1, 2) or "Traceback" in r.output or r.exception and not isinstance(r.exception, SystemExit) \
                or len(errors) != 1:
            failures.append((name, r.exit_code, r.output[-500:], repr(r.exception)))
    assert not failures, failures
    assert _snapshot(good_run) == protected
    assert not list(Path.cwd().glob("runs")), "a case wrote into the working directory"


# -- a hostile user's round (2026-11-27, about 190 cases): what it found, one test per class ---------------------------

def test_outputs_never_collide_with_inputs_or_each_other(good_run, tmp_path, image_file):
    folder = _images(tmp_path / "imgs", n=3)
    before = _snapshot(folder)
    msg = one_line_error(invoke("fid", folder, "--save-stats", folder / "0.png"), 2)
    assert ".npz" in msg
    msg = one_line_error(invoke("fid", folder, "--save-stats", folder / "stats.npz"), 2)
    assert "into the input" in msg
    msg = one_line_error(invoke("schedule-plot", "--preset", "tiny", "--out", tmp_path / "x.png", "--csv", folder / "0.png"), 2)
    assert ".csv" in msg
    one_line_error(invoke("schedule-plot", "--preset", "tiny", "--out", tmp_path / "s.svg", "--csv", tmp_path / "s.svg"), 2)
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--steps", 2, "--out", tmp_path / "g.png",
                                "--trajectory", tmp_path / "g.png"), 2)
    assert "same file" in msg
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--steps", 2, "--out-dir", folder,
                                "--out", folder / "000001.png"), 2)
    assert "--out-dir" in msg
    (tmp_path / "afile").write_text("x")
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--steps", 2, "--out-dir", tmp_path / "afile"), 2)
    assert "not a directory" in msg
    assert _snapshot(folder) == before


@pytest.mark.parametrize("args", [
    ["schedule-plot", "--preset", "tiny", "--set", "model.channel_mult=[]"],
    ["schedule-plot", "--preset", "tiny", "--size", "100000"],
    ["schedule-plot", "--preset", "tiny", "--size", "2048"],
    ["schedule-plot", "--preset", "tiny", "--compare", "nan"],
    ["schedule-plot", "--preset", "tiny", "--compare", "inf"],
    ["blur-preview", "IMAGE", "--preset", "tiny", "--size", "100000"],
    ["train", "--preset", "tiny", "--set", "data.resolution=4096"],
    ["sample", "--run", "RUN", "--device", "cpu:1"],
    ["sample", "--run", "RUN", "--device", ""],
])
def test_values_that_ran_out_of_memory_or_crashed(good_run, tmp_path, image_file, args):
    args = [{"IMAGE": image_file, "RUN": good_run}.get(a, a) for a in args]
    r = invoke(*args, "--out", tmp_path / ("r" if args[0] == "train" else "o.png"))
    one_line_error(r, 2)


def test_presets_that_are_not_text_or_contradict_themselves(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00d\x00a\x00t\x00a")
    assert "UTF-8" in one_line_error(invoke("schedule-plot", "--preset", binary, "--out", tmp_path / "s.png"), 2)
    bad = tmp_path / "logsnr.yaml"
    bad.write_text("diffusion:\n  logsnr_min: 10\n  logsnr_max: -10\n")
    msg = one_line_error(invoke("schedule-plot", "--preset", bad, "--out", tmp_path / "s.png"), 2)
    assert "diffusion.logsnr_min must be in [-50, -5] and logsnr_max in [5, 50]" in msg
    msg = one_line_error(invoke("schedule-plot", "--preset", "tiny", "--set", "model.channel_mult=[" + "1," * 5000 + "1]",
                                "--out", tmp_path / "s.png"), 2)
    assert len(msg) < 200


def test_inputs_that_are_pipes_are_refused_not_waited_on(tmp_path):
    for name in ("fifo.png", "fifo.zip", "fifo.npz"):
        os.mkfifo(tmp_path / name)
    one_line_error(invoke("blur-preview", tmp_path / "fifo.png", "--preset", "tiny", "--out", tmp_path / "p.png"), 1)
    one_line_error(invoke("train", "--preset", "tiny", "--data", tmp_path / "fifo.zip", "--out", tmp_path / "r"), 1)
    one_line_error(invoke("fid", tmp_path / "fifo.npz", tmp_path / "fifo.npz"), 1)


def test_non_finite_weights_newer_formats_and_directories_named_like_checkpoints(good_run, tmp_path):
    state = load_checkpoint(good_run / "checkpoint.pt")
    state["ema"] = {k: torch.full_like(v, float("nan")) for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "nan.pt")
    assert "not finite" in one_line_error(invoke("sample", "--checkpoint", tmp_path / "nan.pt", "--n", 2, "--steps", 2,
                                                 "--out", tmp_path / "g.png"), 1)
    state = load_checkpoint(good_run / "checkpoint.pt")
    state["format"] = 99
    torch.save(state, tmp_path / "new.pt")
    assert "newer bdm" in one_line_error(invoke("sample", "--checkpoint", tmp_path / "new.pt", "--out", tmp_path / "g.png"), 1)
    (tmp_path / "cdir" / "checkpoint.pt").mkdir(parents=True)
    assert "not a checkpoint file" in one_line_error(invoke("sample", "--run", tmp_path / "cdir", "--out", tmp_path / "g.png"), 1)


def test_a_missing_split_beside_other_splits_is_an_error(tmp_path):
    _images(tmp_path / "ds" / "test", n=4)
    msg = one_line_error(invoke("train", "--preset", "tiny", "--data", tmp_path / "ds", "--out", tmp_path / "r", "--steps", 1), 1)
    assert "no 'train' folder but has test" in msg
    _images(tmp_path / "flat", n=4)  # a plain folder of images is still used whole
    r = invoke("train", "--preset", "tiny", "--data", tmp_path / "flat", "--out", tmp_path / "r2", "--steps", 1,
               "--set", "train.batch_size=2")
    assert r.exit_code == 0, r.output


# -- a second hostile round (2026-11-27, about 170 cases) ---------------------------------------------------------------

def test_run_folders_keep_users_files_links_and_other_runs_out(tmp_path):
    mine = tmp_path / "d1"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: config\n")
    assert "config.yaml" in one_line_error(invoke("train", "--preset", "tiny", "--out", mine, "--steps", 1), 2)
    assert (mine / "config.yaml").read_text() == "my: config\n"
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    linked = tmp_path / "d2"
    linked.mkdir()
    (linked / "metrics.jsonl").symlink_to(victim)
    one_line_error(invoke("train", "--preset", "tiny", "--out", linked, "--steps", 1), 2)
    assert victim.read_text() == "mine\n"
    data = _images(tmp_path / "imgs", n=4)
    msg = one_line_error(invoke("train", "--preset", "tiny", "--data", data, "--out", data / "run", "--steps", 1,
                                "--set", "data.split="), 2)
    assert "overlap" in msg


def test_a_second_training_into_the_same_run_is_refused(tmp_path):
    from bdm_cli.errors import UserError
    from bdm_cli.train import _lock

    held = _lock(tmp_path)
    with pytest.raises(UserError, match="another bdm train"):
        _lock(tmp_path)
    held.close()
    _lock(tmp_path).close()  # free again once the first one ends


def test_out_dir_never_replaces_files_or_writes_into_an_input(good_run, tmp_path):
    photos = _images(tmp_path / "photos", n=2)
    (photos / "000000.png").write_bytes((photos / "0.png").read_bytes())
    before = _snapshot(photos)
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--steps", 2, "--out-dir", photos), 2)
    assert "000000.png" in msg
    msg = one_line_error(invoke("fid", "--run", good_run, "--ref", photos, "--out-dir", photos / "s", "--n", 2), 2)
    assert "overlaps the input" in msg
    one_line_error(invoke("fid", photos, photos, "--workers", -1), 2)
    assert _snapshot(photos) == before


@pytest.mark.parametrize("change", [
    lambda s: s["data_stats"].pop("max_u"), lambda s: s["data_stats"].pop("var_u"),
    lambda s: s.update(step=torch.tensor([1, 2])), lambda s: s.update(step=torch.tensor(float("nan"))),
    lambda s: s.update(ema={k: v.to_sparse() for k, v in s["ema"].items()}),
    lambda s: s["data_stats"].update(var_u=-s["data_stats"]["var_u"]),
    lambda s: s["data_stats"].update(min_u=s["data_stats"]["max_u"] + 1),
])
def test_checkpoint_contents_round_two(good_run, tmp_path, change):
    state = load_checkpoint(good_run / "checkpoint.pt")
    change(state)
    torch.save(state, tmp_path / "c.pt")
    one_line_error(invoke("sample", "--checkpoint", tmp_path / "c.pt", "--n", 2, "--steps", 2, "--out", tmp_path / "g.png"), 1)


@pytest.mark.parametrize("value", ["diffusion.logsnr_min=-2000", "diffusion.sigma_blur_max=1e200", "diffusion.logsnr_max=80"])
def test_schedule_values_that_overflow(tmp_path, value):
    one_line_error(invoke("schedule-plot", "--preset", "tiny", "--set", value, "--out", tmp_path / "s.png"), 2)


def test_presets_extend_beside_themselves_and_refuse_aliases(tmp_path, monkeypatch, image_file):
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "base.yaml").write_text("extends: tiny\ndata:\n  resolution: 16\n")
    (tmp_path / "ext" / "child.yaml").write_text("extends: base.yaml\n")
    (tmp_path / "base.yaml").write_text("extends: tiny\ndata:\n  resolution: 32\n")
    monkeypatch.chdir(tmp_path)
    from bdm_cli.config import load_config

    assert load_config(str(tmp_path / "ext" / "child.yaml")).data.resolution == 16
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\ntrain:\n  lr: [*b, *b]\n")
    assert "aliases" in one_line_error(invoke("blur-preview", image_file, "--preset", bomb, "--out", tmp_path / "p.png"), 2)


def test_float_images_duplicate_zip_names_and_upper_case_npz(tmp_path):
    from bdm_cli.data import load_image

    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert abs(float(load_image(tmp_path / "f.tif", 8, 1).mean())) < 0.01  # 0.5 is mid-grey, not black
    folder = _images(tmp_path / "src", n=2)
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as z:
        for p in folder.iterdir():
            z.write(p, "same.png")
    assert "several members" in one_line_error(invoke("train", "--preset", "tiny", "--data", tmp_path / "dup.zip",
                                                      "--out", tmp_path / "r"), 1)
    from bdm_cli.fid import stats_of

    with open(tmp_path / "S.NPZ", "wb") as f:  # np.savez would add ".npz" to a name ending in ".NPZ"
        np.savez(f, mu=np.zeros(2048), sigma=np.eye(2048))
    assert stats_of(str(tmp_path / "S.NPZ"), None, dims=2048, device="cpu")[0].shape == (2048,)


def test_the_cli_own_usage_errors_are_one_line_too():
    """Click's (Typer's) parse errors through the real entry point: one Error: line, exit 2, no usage box."""
    import subprocess
    import sys

    from .conftest import ROOT

    for args in (["sample", "--n", "1.5"], ["train", "--bogus"], ["blur-preview"]):
        p = subprocess.run([sys.executable, "-m", "bdm_cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (args, p.returncode, lines)


# -- round three (a fresh hostile round after the two above) -----------------------------------------------------------

def test_run_folder_checks_look_inside_samples_and_at_killed_runs(good_run, tmp_path):
    """A user's own final.png in DIR/samples (or a dataset there) is never overwritten; a run killed before its first
    checkpoint is not appended to by a new one; only bdm's own temp files are cleaned."""
    own = tmp_path / "own"
    (own / "samples").mkdir(parents=True)
    (own / "samples" / "final.png").write_bytes(b"my picture")
    (own / "samples" / ".notes.tmp").write_text("my notes")
    msg = one_line_error(invoke("train", "--preset", "tiny", "--out", own, "--steps", 2), 2)
    assert "samples/" in msg
    assert (own / "samples" / "final.png").read_bytes() == b"my picture" and (own / "samples" / ".notes.tmp").exists()
    data = _images(tmp_path / "ds" / "samples", n=4)
    msg = one_line_error(invoke("train", "--preset", "tiny", "--data", data, "--out", data.parent, "--steps", 1,
                                "--set", "data.split="), 2)
    assert "overlap" in msg or "not a bdm run's" in msg
    assert sorted(p.name for p in data.iterdir()) == [f"{i}.png" for i in range(4)]
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.yaml").write_bytes((good_run / "config.yaml").read_bytes())
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    assert "before its first checkpoint" in one_line_error(invoke("train", "--preset", "tiny", "--out", killed, "--steps", 2), 2)
    assert (killed / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'
    (killed / "metrics.jsonl").write_text("")  # failed before its first logged step: a new run may start there
    assert invoke("train", "--preset", "tiny", "--out", killed, "--steps", 1).exit_code == 0


def test_outputs_never_replace_the_commands_own_input(good_run, tmp_path, image_file):
    photo = tmp_path / "photo.png"
    photo.write_bytes(image_file.read_bytes())
    assert "input" in one_line_error(invoke("blur-preview", photo, "--preset", "tiny", "--out", photo))
    assert photo.read_bytes() == image_file.read_bytes()
    ck = tmp_path / "ck.png"
    ck.write_bytes((good_run / "checkpoint.pt").read_bytes())
    one_line_error(invoke("sample", "--checkpoint", ck, "--n", 2, "--steps", 2, "--out", ck))
    assert ck.read_bytes() == (good_run / "checkpoint.pt").read_bytes()


def test_non_finite_samples_are_an_error_not_black_images(good_run, tmp_path):
    state = load_checkpoint(good_run / "checkpoint.pt")
    for key in ("model", "ema"):  # finite weights whose products overflow
        state[key] = {k: v * 1e30 if v.is_floating_point() else v for k, v in state[key].items()}
    run = tmp_path / "big"
    run.mkdir()
    torch.save(state, run / "checkpoint.pt")
    msg = one_line_error(invoke("sample", "--run", run, "--n", 2, "--steps", 2, "--out", tmp_path / "g.png"), 1)
    assert "not finite" in msg and not (tmp_path / "g.png").exists()


def test_fid_cache_keys_on_the_weights_content_and_survives_an_unwritable_cache(tmp_path, monkeypatch):
    from bdm_cli import fid

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    (tmp_path / "a" / "w.pth").write_bytes(b"weights A")
    (tmp_path / "b" / "w.pth").write_bytes(b"weights B")
    monkeypatch.chdir(tmp_path / "a")
    id_a = fid.weights_id("w.pth")
    monkeypatch.chdir(tmp_path / "b")
    assert fid.weights_id("w.pth") != id_a  # same name as typed, other weights
    (tmp_path / "b" / "w.pth").write_bytes(b"weights A")
    assert fid.weights_id("w.pth") == id_a  # the same bytes elsewhere share the cache
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "a" / "w.pth"))  # a file: the cache cannot be written
    imgs = _images(tmp_path / "imgs", n=3)
    with pytest.warns(UserWarning, match="could not be written"):
        mu, sigma, n, _ = fid.stats_of(str(imgs), fid.inception(64, "random"), dims=64, device="cpu", workers=0)
    assert n == 3 and np.isfinite(mu).all()


def test_fid_options_that_would_be_silently_ignored(tmp_path, good_run):
    a = tmp_path / "a.npz"
    np.savez(a, mu=np.zeros(2048), sigma=np.eye(2048))
    assert "reference once" in one_line_error(invoke("fid", a, a, "--run", good_run, "--n", 4), 2)
    for extra in (("--steps", 3), ("--sampler", "ddim"), ("--n", 8), ("--out-dir", tmp_path / "never"), ("--ref", a)):
        assert "only appl" in one_line_error(invoke("fid", a, a, *extra), 2)
    assert not (tmp_path / "never").exists()


def test_statistics_that_are_not_covariances_or_have_nan_features(tmp_path):
    from bdm_cli.errors import UserError
    from bdm_cli.fid import frechet_distance, read_stats

    rng = np.random.default_rng(0)
    feats = rng.random((50, 64)).astype("f4")
    feats[3, 5] = np.nan
    np.savez(tmp_path / "nan.npz", mu=np.zeros(64), sigma=np.eye(64), n=50, feats=feats)
    sigma = np.eye(64)
    sigma[0, 0] = -1e6
    np.savez(tmp_path / "neg.npz", mu=np.zeros(64), sigma=sigma)
    asym = np.eye(64)
    asym[0, 1] = 5.0
    np.savez(tmp_path / "asym.npz", mu=np.zeros(64), sigma=asym)
    for name in ("nan", "neg", "asym"):
        with pytest.raises(UserError, match="not a .npz of FID statistics"):
            read_stats(tmp_path / f"{name}.npz", 64)
    x = rng.random((10, 4))
    s = np.cov(x, rowvar=False)
    assert frechet_distance(x.mean(0), s, x.mean(0), s) >= 0.0  # rounding never shows as a negative FID


def test_save_stats_of_a_npz_without_a_count(tmp_path, monkeypatch):
    from bdm_cli import fid

    src = tmp_path / "pf.npz"
    np.savez(src, mu=np.zeros(64), sigma=np.eye(64))  # pytorch-fid's own files have no n
    monkeypatch.setattr(fid, "inception", lambda *a, **k: None)  # no Inception needed for a .npz
    r = invoke("fid", src, "--save-stats", tmp_path / "re.npz", "--dims", 64)
    assert r.exit_code == 0 and "no image count" in r.output and "-1 images" not in r.output, r.output  # not the path's
    assert "n" not in np.load(tmp_path / "re.npz").files


def test_split_folders_under_several_class_folders_are_refused(tmp_path):
    for cls in ("cats", "dogs"):
        _images(tmp_path / "odd" / cls / "train", n=2)
        _images(tmp_path / "odd" / cls / "test", n=1)
    msg = one_line_error(invoke("train", "--preset", "tiny", "--data", tmp_path / "odd", "--out", tmp_path / "r",
                                "--steps", 1, "--batch-size", 2), 1)
    assert "several folders" in msg


def test_builtin_names_shadowed_by_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "digits", n=2)
    assert "built-in" in one_line_error(invoke("fid", "digits", "--save-stats", tmp_path / "d.npz"), 1)
    assert "built-in" in one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--steps", 1), 1)


def test_error_lines_escape_newlines_and_long_names_are_written(tmp_path, monkeypatch):
    msg = one_line_error(invoke("fid", str(tmp_path / "no\nsuch"), str(tmp_path / "x")), 1)
    assert "no\\nsuch" in msg
    monkeypatch.chdir(tmp_path)
    long = "a" * 245 + ".png"
    r = invoke("schedule-plot", "--preset", "tiny", "--out", long)
    assert r.exit_code == 0 and (tmp_path / long).is_file(), r.output


def test_blur_preview_memory_is_bounded(image_file, tmp_path):
    ts = ",".join(["0.5"] * 13)
    msg = one_line_error(invoke("blur-preview", image_file, "--preset", "tiny", "--size", 2048, "--t", ts,
                                "--out", tmp_path / "s.png"), 2)
    assert "--t takes at most 12" in msg


def test_presets_extending_themselves_through_other_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("extends: ../sub/a.yaml\n")
    msg = one_line_error(invoke("schedule-plot", "--preset", "sub/a.yaml", "--out", tmp_path / "p.png"))
    assert "loop" in msg and len(msg) < 300


def test_names_that_are_not_utf8_print_escaped_on_a_strict_terminal(tmp_path):
    """A UTF-8 terminal cannot encode a file name's undecodable bytes: the name is printed escaped, not a traceback
    after the work is done."""
    import subprocess
    import sys

    out = os.fsencode(str(tmp_path)) + b"/\xfc.png"
    p = subprocess.run([sys.executable, "-m", "bdm_cli", "schedule-plot", "--preset", "tiny", "--size", "8", "--out", out],
                       capture_output=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=120)
    assert p.returncode == 0 and b"Traceback" not in p.stdout + p.stderr, p.stderr[-2000:]
    assert os.path.exists(out) and (b"\\udcfc" in p.stdout or b"\\xfc" in p.stdout), p.stdout


# -- round four ---------------------------------------------------------------------------------------------------------

def test_images_too_large_for_their_format_are_refused_before_encoding(image_file, tmp_path):
    ts = ",".join(["0.5"] * 130)  # 131 tiles of 128 px: wider than WebP's 16383 px
    msg = one_line_error(invoke("blur-preview", image_file, "--size", 8, "--preset", "tiny", "--t", ts, "--out", tmp_path / "x.webp"))
    assert "larger than WEBP" in msg and not (tmp_path / "x.webp").exists()
    assert invoke("blur-preview", image_file, "--size", 8, "--preset", "tiny", "--t", ts, "--out", tmp_path / "x.png").exit_code == 0


def test_blur_preview_bound_counts_the_drawn_tiles(image_file, tmp_path):
    ts = ",".join(["0.5"] * 3100)  # tiny tiles are drawn at 128 px
    assert "--t takes at most 3072" in one_line_error(invoke("blur-preview", image_file, "--size", 2, "--preset", "tiny",
                                                             "--t", ts, "--out", tmp_path / "s.png"), 2)


@pytest.mark.parametrize("env", [{"RANK": "abc", "WORLD_SIZE": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
                                 {"RANK": "0", "WORLD_SIZE": "1"}, {"RANK": "1"}])
def test_torchrun_variables_set_by_mistake(tmp_path, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    one_line_error(invoke("train", "--preset", "tiny", "--steps", 1, "--out", tmp_path / "r"), 1)


def test_home_in_path_options_is_expanded(good_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert invoke("sample", "--run", good_run, "--n", 2, "--steps", 1, "--out-dir=~/sx").exit_code == 0
    assert len(list((tmp_path / "sx").glob("*.png"))) == 2 and not (tmp_path / "~").exists()


@pytest.mark.parametrize("value, field", [("010", 10), ("0100", 100)])
def test_set_numbers_are_decimal(value, field):
    from bdm_cli.config import load_config

    assert load_config("tiny", [f"train.steps={value}"]).train.steps == field


@pytest.mark.parametrize("override", ["train.steps=1:30", "train.lr=1:30", "train.steps=" + "1" * 5000,
                                      "model.channels=" + "[" * 2000])
def test_set_values_that_used_to_crash_or_change_meaning(tmp_path, override):
    one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--set", override), 2)


def test_preset_files_with_huge_numbers_or_deep_nesting(tmp_path):
    for text in ("train: {steps: " + "1" * 5000 + "}\n", "model: {channels: " + "[" * 2000 + "}\n"):
        (tmp_path / "p.yaml").write_text(text)
        one_line_error(invoke("schedule-plot", "--preset", tmp_path / "p.yaml", "--out", tmp_path / "p.png"))


@pytest.mark.parametrize("change", ["meta", "float8", "bool", "complex", "stats_meta"])
def test_checkpoint_tensors_of_other_kinds(good_run, tmp_path, change):
    state = load_checkpoint(good_run / "checkpoint.pt")
    to = {"meta": lambda v: v.to("meta"), "float8": lambda v: v.to(torch.float8_e4m3fn), "bool": lambda v: v.bool(),
          "complex": lambda v: v.to(torch.complex64)}
    if change == "stats_meta":
        state["data_stats"] = {k: v.to("meta") for k, v in state["data_stats"].items()}
    else:
        state["ema"] = {k: to[change](v) if v.is_floating_point() else v for k, v in state["ema"].items()}
    torch.save(state, tmp_path / "ck.pt")
    one_line_error(invoke("sample", "--checkpoint", tmp_path / "ck.pt", "--n", 2, "--steps", 1, "--out", tmp_path / "o.png"))
    assert not (tmp_path / "o.png").exists()


def test_statistics_far_beyond_inception_features(tmp_path, monkeypatch):
    from bdm_cli import fid

    monkeypatch.setattr(fid, "inception", lambda *a, **k: pytest.fail("no Inception is needed for two .npz"))
    np.savez(tmp_path / "huge.npz", mu=np.zeros(64), sigma=np.eye(64) * 1e200)
    np.savez(tmp_path / "hugemu.npz", mu=np.full(64, 1e200), sigma=np.eye(64))
    np.savez(tmp_path / "ok.npz", mu=np.zeros(64), sigma=np.eye(64))
    for bad in ("huge", "hugemu"):
        assert "beyond Inception" in one_line_error(invoke("fid", tmp_path / f"{bad}.npz", tmp_path / "ok.npz", "--dims", 64), 1)
    r = invoke("fid", tmp_path / "ok.npz", tmp_path / "ok.npz", "--dims", 64)
    assert r.exit_code == 0 and "FID: 0.0000" in r.output, r.output


def test_inception_weights_with_nan_are_refused(tmp_path):
    from bdm_cli import fid
    from bdm_cli.errors import UserError

    state = torch.load(shared_file("fid/pt_inception-2015-12-05.pth"), weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"][:] = float("nan")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match="not finite"):
        fid.inception(64, tmp_path / "w.pth")


def test_resume_refuses_a_hand_edited_config_and_trims_metrics_after_its_checkpoint(tmp_path):
    run = tmp_path / "r"
    assert invoke("train", "--preset", "tiny", "--out", run, "--steps", 2, "--set", "train.log_every=1").exit_code == 0
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("lr: 0.001", "lr: 0.5"))
    assert "was changed" in one_line_error(invoke("train", "--resume", run, "--steps", 3), 2)
    assert "lr: 0.5" in (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text)
    with open(run / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint, then kill -9
        f.write('{"step": 3, "loss": 0.1}\n')
    assert invoke("train", "--resume", run, "--steps", 3, "--set", "train.log_every=1").exit_code == 0
    import json
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps


def test_run_and_checkpoint_together_empty_env_and_limits(good_run, tmp_path, monkeypatch):
    one_line_error(invoke("sample", "--run", tmp_path / "none", "--checkpoint", good_run / "checkpoint.pt", "--n", 1,
                          "--steps", 1, "--out", tmp_path / "a.png"), 2)
    from bdm_cli import fid

    monkeypatch.setenv("BDM_CACHE_DIR", "")
    assert not str(fid.cache_dir()).startswith("fid")
    for override in ("sample.n=2000", "train.ema_decay=1"):
        one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--set", override), 2)


# -- round five ----------------------------------------------------------------------------------------------------------

def test_fid_save_stats_never_over_its_checkpoint_or_weights(good_run, tmp_path):
    ck = tmp_path / "ck.npz"
    ck.write_bytes((good_run / "checkpoint.pt").read_bytes())
    imgs = _images(tmp_path / "imgs", n=3)
    one_line_error(invoke("fid", "--checkpoint", ck, "--ref", imgs, "--n", 2, "--steps", 1, "--dims", 64,
                          "--save-stats", ck), 2)
    assert ck.read_bytes() == (good_run / "checkpoint.pt").read_bytes()


def test_a_users_partial_config_yaml_is_not_taken_for_a_runs(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    text = "# my note\ntrain:\n  steps: 2\n"
    (exp / "config.yaml").write_text(text)
    one_line_error(invoke("train", "--preset", exp / "config.yaml", "--out", exp, "--steps", 2), 2)
    (exp / "other.yaml").write_text("extends: tiny\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("extends: tiny\ntrain:\n  steps: 2\n")
    one_line_error(invoke("train", "--preset", "tiny", "--out", mine, "--steps", 1), 2)
    assert (exp / "config.yaml").read_text() == text


def test_a_weights_file_named_random_is_hashed_like_any_other(tmp_path, monkeypatch):
    from bdm_cli import fid

    monkeypatch.chdir(tmp_path)
    (tmp_path / "random").write_bytes(b"weights A")
    a = fid.weights_id(Path("random"))
    (tmp_path / "random").write_bytes(b"weights B")
    assert fid.weights_id(Path("random")) not in (a, "random")


def test_statistics_whose_headers_declare_huge_arrays(tmp_path):
    import io

    from numpy.lib import format as npformat

    from bdm_cli.errors import UserError
    from bdm_cli.fid import read_stats

    def member(shape):
        b = io.BytesIO()
        npformat.write_array_header_1_0(b, {"descr": "<f8", "fortran_order": False, "shape": shape})
        b.write(bytes(64))
        return b.getvalue()

    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as z:
        z.writestr("mu.npy", member((10**13,)))
        z.writestr("sigma.npy", member((64, 64)))
    with pytest.raises(UserError, match="declares"):
        read_stats(tmp_path / "bomb.npz", 64)


def test_a_huge_file_in_an_image_folder_is_not_read_whole_for_the_cache_key(tmp_path):
    from bdm_cli.fid import ImageSource

    folder = _images(tmp_path / "big", n=2)
    with open(folder / "zz.png", "wb") as f:  # sparse: no disk used
        f.truncate(1 << 40)
    ImageSource(folder).content_key()  # returns at once, without reading a terabyte


def test_an_indefinite_sigma_is_an_error_not_a_zero_fid(tmp_path):
    from bdm_cli.errors import UserError
    from bdm_cli.fid import frechet_distance

    with pytest.raises(UserError, match="not a covariance"):
        frechet_distance(np.zeros(64), 1.5 * np.eye(64) - 0.5 * np.ones((64, 64)), np.zeros(64), np.eye(64))


# -- round six ------------------------------------------------------------------------------------------------------------

def test_round_six_inputs(good_run, tmp_path, monkeypatch, image_file):
    folder = _images(tmp_path / "imgs.npz", n=3)  # a folder whose name ends in .npz holds images
    good = tmp_path / "good.npz"
    f = np.abs(np.random.default_rng(0).standard_normal((10, 64)))
    np.savez(good, mu=f.mean(0), sigma=np.cov(f.T), n=10, feats=f)
    np.savez(tmp_path / "huge.npz", mu=f.mean(0), sigma=np.cov(f.T), n=10, feats=f * 1e120)
    from bdm_cli import fid

    monkeypatch.setattr(fid, "inception", lambda *a, **k: (_ for _ in ()).throw(fid.UserError("inception was loaded")))
    assert "inception was loaded" in one_line_error(invoke("fid", folder, good, "--dims", 64, "--workers", 0), 1)
    assert "beyond Inception" in one_line_error(invoke("fid", tmp_path / "huge.npz", good, "--dims", 64), 1)
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"weights")
    monkeypatch.setenv("BDM_INCEPTION_WEIGHTS", str(weights))
    one_line_error(invoke("fid", folder, "--save-stats", weights, "--dims", 64), 2)
    assert weights.read_bytes() == b"weights"
    one_line_error(invoke("fid", folder, good, "--dims", 64, "--batch-size", 2**63), 2)
    monkeypatch.delenv("BDM_INCEPTION_WEIGHTS")
    run = _copy_run(good_run, tmp_path / "run")
    (run / "samples").mkdir()
    _images(run / "samples", n=2)
    assert "overlap" in one_line_error(invoke("train", "--resume", run, "--steps", 3, "--data", run / "samples"), 2)
    assert "below the run's step" in one_line_error(invoke("train", "--resume", run, "--steps", 1), 2)
    (run / ".lock").unlink(missing_ok=True)
    os.mkfifo(run / ".lock")
    one_line_error(invoke("train", "--resume", run, "--steps", 3), 1)
    one_line_error(invoke("schedule-plot", "--preset", "tiny", "--sigma-blur-max", 5, "--compare", "0,10",
                          "--out", tmp_path / "c.png"), 2)
    one_line_error(invoke("blur-preview", image_file, "--preset", "tiny", "--size", 0, "--out", tmp_path / "p.png"), 2)


def test_a_zip_member_is_refused_from_its_declared_size(tmp_path):
    from bdm_cli.data import read_member

    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("0.png", "w", force_zip64=True) as f:
            for _ in range(300):
                f.write(b"\0" * (1 << 20))
    with zipfile.ZipFile(tmp_path / "bomb.zip") as z, pytest.raises(OSError, match="uncompressed"):
        read_member(z, "0.png")


# -- round seven ----------------------------------------------------------------------------------------------------------

def test_tilde_paths_expand_only_as_a_shell_would(tmp_path, monkeypatch, image_file):
    """``~`` and ``~/x`` are the home folder; ``./~x`` is a file here and ``~name`` of no user is that name (a shell's
    rules), never a traceback or the home folder instead of a local ``~`` folder; an empty HOME is not the root."""
    from bdm_cli.paths import cache_home, home, user_path

    monkeypatch.chdir(tmp_path)
    assert invoke("schedule-plot", "--preset", "tiny", "--size", 8, "--out", "./~x.png").exit_code == 0
    assert (tmp_path / "~x.png").is_file()
    assert "does not exist" in one_line_error(invoke("schedule-plot", "--preset", "tiny", "--out", "~nosuchuser_bdm/x.png"), 1)
    (tmp_path / "~").mkdir()
    (tmp_path / "~" / "one.png").write_bytes(Path(image_file).read_bytes())
    r = invoke("blur-preview", "./~/one.png", "--preset", "tiny", "--t", "0.5", "--out", "strip.png")
    assert r.exit_code == 0 and (tmp_path / "strip.png").is_file(), r.output
    assert user_path("~/a") == home() / "a" and user_path("./~x") == Path("~x") and user_path("~nosuchuser_bdm") == Path("~nosuchuser_bdm")
    monkeypatch.setenv("HOME", "")
    assert home() != Path("/") and cache_home().parts[1:2] != (".cache",)


def test_round_seven_values(good_run, tmp_path, image_file):
    """Seeds outside 0..2^63-1 (which aliased smaller ones), ``0_5`` read as five, a flag's error naming --set, an
    unbounded --compare, a YAML key given twice (which dropped a whole section), NaN pixels (a black image)."""
    for cmd in (["sample", "--run", good_run, "--seed", -1], ["sample", "--run", good_run, "--seed", 2**64],
                ["blur-preview", image_file, "--seed", 2**64], ["fid", "--run", good_run, "--ref", "digits", "--seed", 2**63]):
        r = invoke(*cmd)  # Click's own range check (one Error line through the entry point: test above)
        assert r.exit_code == 2 and "--seed" in r.output, r.output
    assert "'0_5'" in one_line_error(invoke("blur-preview", image_file, "--t", "0_5"), 2)
    assert one_line_error(invoke("blur-preview", image_file, "--sigma-blur-max", -1), 2).startswith("Error: --sigma-blur-max")
    assert "at most" in one_line_error(invoke("schedule-plot", "--compare", ",".join(["1"] * 500), "--out", tmp_path / "c.png"), 2)
    assert not (tmp_path / "c.png").exists()
    preset = tmp_path / "dup.yaml"
    preset.write_text("extends: tiny\ntrain:\n  lr: 0.5\ntrain:\n  steps: 3\n")
    assert "twice" in one_line_error(invoke("train", "--preset", preset, "--out", tmp_path / "r"), 2)
    arr = np.full((40, 40), 0.5, np.float32)
    arr[3, 3] = np.nan
    Image.fromarray(arr, "F").save(tmp_path / "nan.tif")
    assert "not finite" in one_line_error(invoke("blur-preview", tmp_path / "nan.tif", "--preset", "tiny",
                                                 "--out", tmp_path / "o.png"), 1)
    from bdm_cli.data import FileImages

    (tmp_path / "imgs").mkdir()
    Image.fromarray(arr, "F").save(tmp_path / "imgs" / "nan.tif")
    with pytest.warns(UserWarning, match="not finite"):
        assert FileImages(tmp_path / "imgs", ["nan.tif"], 8, 1)[0] is None  # skipped and counted, not a black image


def test_round_seven_resume_and_failed_runs(good_run, tmp_path, monkeypatch):
    """--resume of the checkpoint file, or --set of what the weights were made for, says so (it blamed the checkpoint);
    a hand-edited model key is not told to use --set; a failed first start leaves no folder behind, nor does a
    CIFAR-10 download that could not start."""
    run = _copy_run(good_run, tmp_path / "run")
    assert "run's folder" in one_line_error(invoke("train", "--resume", run / "checkpoint.pt"), 2)
    msg = one_line_error(invoke("train", "--resume", run, "--set", "data.resolution=16", "--steps", 4), 2)
    assert "cannot change on --resume" in msg and "data.resolution" in msg
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("channels: 8", "channels: 16", 1))
    msg = one_line_error(invoke("train", "--resume", run, "--steps", 4), 2)
    assert "new run" in msg and "--set model" not in msg
    one_line_error(invoke("train", "--preset", "tiny", "--data", _images(tmp_path / "few", n=1), "--out", tmp_path / "r"), 1)
    assert not (tmp_path / "r").exists()

    import torchvision.datasets

    from bdm_cli.data import DataError, cifar10_uint8

    def offline(root, **kw):
        Path(root).mkdir(parents=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("BDM_DATA_DIR", str(tmp_path / "nodata"))
    with pytest.raises(DataError, match="could not be downloaded"):
        cifar10_uint8("test")
    assert not (tmp_path / "nodata").exists()


def test_numbered_samples_never_replace_another_writers(tmp_path):
    """Two `bdm sample --out-dir` into one folder at once: the second writer of a number stops with an error instead
    of silently replacing the first one's sample (the folder held a mix of both runs)."""
    from bdm_cli.io import OutputError, save_numbered

    save_numbered(torch.zeros(2, 1, 4, 4), tmp_path, 0)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match="another process"):
        save_numbered(torch.ones(2, 1, 4, 4), tmp_path, 1)
    assert _snapshot(tmp_path) == before  # no temporary file left either


def test_mostly_unreadable_data_stops_training_with_its_checkpoint(tmp_path):
    """A dataset of which most files cannot be decoded (changed under a running training, say) stops the run with one
    error, instead of 'Done' after steps that trained on nothing."""
    folder = _images(tmp_path / "imgs", n=2)
    for i in range(30):
        (folder / f"bad{i}.png").write_bytes(b"not a png")
    r = invoke("train", "--preset", "tiny", "--data", folder, "--out", tmp_path / "r", "--steps", 10)
    msg = one_line_error(r, 1)  # round twenty-two: it said "the last checkpoint is kept" where none was written
    assert "could not be decoded" in msg and "no checkpoint was written yet" in msg, msg
    r = invoke("train", "--preset", "tiny", "--data", folder, "--out", tmp_path / "r2", "--steps", 400,
               "--set", "train.checkpoint_every=2", "--set", "train.log_every=4", "--set", "train.batch_size=16")
    msg = one_line_error(r, 1)  # and batches of which no image could be read stop at the next log, not at the end
    step = load_checkpoint(tmp_path / "r2")["step"]
    assert f"the checkpoint of step {step} is kept" in msg and step < 40, msg


def test_the_entry_point_with_no_arguments_closed_or_broken_output(tmp_path):
    """Through the real entry point: `bdm` alone prints its help and no empty Error line; a closed stdout (>&-) is one
    error, not silence (and a later file never takes its number); a reader that stops early (| head -1) ends nothing
    with a traceback or a silent exit 1; warnings are one line each, without Python's source line."""
    import subprocess
    import sys

    from .conftest import ROOT

    def bdm(*args, **kw):
        return subprocess.run([sys.executable, "-m", "bdm_cli", *map(str, args)], cwd=ROOT, timeout=300, **kw)

    p = bdm(capture_output=True, text=True)
    assert p.returncode == 2 and "Usage" in p.stdout and "Error" not in p.stdout + p.stderr
    p = bdm("presets", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: os.close(1))
    assert p.returncode == 2 and p.stderr.count("Error:") == 1 and "closed" in p.stderr, p.stderr
    read, write = os.pipe()
    os.close(read)  # the reader is gone before bdm writes a byte
    p = bdm("presets", "--verbose", stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr
    folder = _images(tmp_path / "imgs", n=16)
    (folder / "bad.png").write_bytes(b"not a png")
    p = bdm("train", "--preset", "tiny", "--data", folder, "--out", tmp_path / "r", "--steps", 2, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Warning: skipping unreadable image" in p.stderr and "warnings.warn" not in p.stderr, p.stderr


# -- round eight ----------------------------------------------------------------------------------------------------------

def test_a_second_train_that_loses_the_lock_never_removes_the_run(tmp_path, monkeypatch):
    """Two `bdm train --out SAME` started together: both saw no folder; the one that lost the lock removed the
    folder of the one training (its first checkpoint not written yet). Now the loser leaves it alone."""
    from bdm_cli import train as train_module

    run = tmp_path / "run"

    def taken(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')  # the winner's, training
        raise train_module.RunLocked(f"another bdm train is writing into {run_dir}")

    monkeypatch.setattr(train_module, "_lock", taken)
    assert "another bdm train" in one_line_error(invoke("train", "--preset", "tiny", "--out", run), 1)
    assert (run / "metrics.jsonl").is_file()


def test_sample_seeds_never_share_a_generator():
    """Per-sample generators came from seed * 1_000_003 + i (mod 2^63): seed 6886434827944434283's samples were
    seed 0's shifted by one. Now a hash of (seed, index)."""
    from bdm_cli.generate import sample_generators

    def first(seed, indices):
        return [torch.rand(1, generator=g).item() for g in sample_generators(seed, indices, torch.device("cpu"))]

    assert first(6886434827944434283, range(2)) != first(0, range(1, 3))
    assert first(1, range(1)) != first(0, range(1_000_003, 1_000_004))
    values = [v for seed in range(20) for v in first(seed, range(20))]
    assert len(set(values)) == len(values) and first(3, range(5, 8)) == first(3, range(8))[5:]


def test_training_streams_never_share_a_generator():
    """Training drew its epochs from seed * 100_003 + epoch and its noise from seed * 1000 + rank: seed 1's first
    epoch was seed 0's 100,003rd, seed 1's rank 0 seed 0's rank 1000. Now hashes of (purpose, seed, epoch or rank)."""
    from bdm_cli.runtime import seed_of
    from bdm_cli.train import StepBatches

    def epoch(seed, e):
        stream = StepBatches(50, 50, seed, e, e + 1)
        return next(iter(stream))

    assert epoch(1, 0) != epoch(0, 100_003) and epoch(2**63 - 1, 5) != epoch(0, 5)
    seeds = {seed_of(p, s, r) for p in ("train", "dropout", "epoch") for s in range(30) for r in range(30)}
    assert len(seeds) == 3 * 30 * 30 and all(0 <= s < 2**63 for s in seeds)


def test_round_eight_inputs(good_run, tmp_path, monkeypatch):
    """Weights files that are no state dict, a zip whose member data changed under the same CRC (a stale cache),
    outputs inside --out-dir's subfolders, folders left by failed commands, unbounded counts."""
    for content in (b"hi\n", None, torch.zeros(3)):
        path = tmp_path / "w.pt"
        if content is None or isinstance(content, torch.Tensor):
            torch.save([1, 2, 3] if content is None else content, path)
        else:
            path.write_bytes(content)
        msg = one_line_error(invoke("fid", "digits", "digits", "--dims", 64, "--inception-weights", path), 1)
        assert "not a pt_inception" in msg and "weights_only" not in msg
    from bdm_cli.fid import ImageSource

    zpath = _zip_with(tmp_path / "a.zip", lambda raw: None)
    key = ImageSource(zpath).content_key()
    data = bytearray(zpath.read_bytes())
    data[60] ^= 0xFF  # inside the first member's data: its CRC in the directory stays as it was
    zpath.write_bytes(bytes(data))
    assert ImageSource(zpath).content_key() != key

    (tmp_path / "sd" / "sub").mkdir(parents=True)
    one_line_error(invoke("sample", "--run", good_run, "--n", 3, "--out-dir", tmp_path / "sd", "--out",
                          tmp_path / "sd" / "sub" / "grid.png"), 2)
    one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--out-dir", tmp_path / "new" / "x", "--device", "cpu:1"), 2)
    one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "p1" / "p2" / "run", "--data",
                          _images(tmp_path / "one", n=1)), 1)
    assert not (tmp_path / "new").exists() and not (tmp_path / "p1").exists()
    one_line_error(invoke("sample", "--run", good_run, "--batch-size", 10**6), 2)
    one_line_error(invoke("sample", "--run", good_run, "--n", 10**12, "--out-dir", tmp_path / "huge"), 2)
    one_line_error(invoke("fid", "digits", "digits", "--kid-subsets", 10**20), 2)
    one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "nw", "--set", "data.num_workers=100000"), 2)
    cache = tmp_path / "afile"
    cache.write_text("not a folder")
    monkeypatch.setenv("BDM_CACHE_DIR", str(cache))
    from bdm_cli import fid

    real = fid.inception(64, "random")
    monkeypatch.setattr(fid, "inception", lambda *a, **k: real)
    monkeypatch.setattr(fid, "weights_id", lambda *a, **k: "random")
    folder = _images(tmp_path / "imgs", n=3)
    with pytest.warns(UserWarning, match="could not be written"):
        assert invoke("fid", folder, folder, "--dims", 64, "--workers", 0).exit_code == 0


# -- round nine ----------------------------------------------------------------------------------------------------

def test_fid_of_a_run_reads_its_reference_before_sampling(good_run, tmp_path, monkeypatch):
    """An empty reference fails at once: no sample is drawn or written before it is known (it used to sample all of
    --n first)."""
    import bdm_cli.generate as gen
    from bdm_cli import fid

    real_net = fid.inception(64, "random")
    monkeypatch.setattr(fid, "inception", lambda *a, **k: real_net)
    drawn = []
    real = gen.sample_batches
    monkeypatch.setattr(gen, "sample_batches", lambda *a, **k: drawn.append(1) or real(*a, **k))
    (tmp_path / "empty").mkdir()
    msg = one_line_error(invoke("fid", "--run", good_run, "--ref", tmp_path / "empty", "--n", 4, "--steps", 2,
                                "--dims", 64, "--out-dir", tmp_path / "png"))
    assert "empty" in msg or "no image" in msg, msg
    assert not drawn and not (tmp_path / "png").exists()
    stats = []  # and the checkpoint's errors come before the reference's statistics
    monkeypatch.setattr(fid, "stats_of", lambda *a, **k: stats.append(1))
    for args in (("--run", good_run, "--checkpoint", good_run / "checkpoint.pt"), ("--run", tmp_path / "nosuchrun")):
        one_line_error(invoke("fid", *args, "--ref", "digits", "--n", 4, "--dims", 64))
    assert not stats


def test_missing_inception_weights_offline_leave_no_hub_folder(tmp_path, monkeypatch):
    """pytorch-fid's download, offline: one line that says what to do, no 'Downloading:' print, and the
    $TORCH_HOME folders it would have made are removed again."""
    import torch.hub

    def offline(url, dst, *a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.delenv("BDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    r = invoke("fid", "digits", "digits", "--dims", 64)
    msg = one_line_error(r, 1)
    assert "--inception-weights" in msg and "Downloading" not in r.output
    assert not (tmp_path / "th").exists()


def test_round_nine_inputs(good_run, tmp_path, monkeypatch):
    """float64 statistics in a checkpoint, a config.yaml section that is no mapping, an empty fid input, learning
    rates and weight decays that make inf weights, a schedule with no span, narrow COLUMNS, ~ in fid inputs and
    BDM_CACHE_DIR, and the cache key of weights found in $TORCH_HOME."""
    run = _copy_run(good_run, tmp_path / "f64")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["data_stats"] = {k: v.double() for k, v in state["data_stats"].items()}
    torch.save(state, run / "checkpoint.pt")
    r = invoke("sample", "--run", run, "--n", 2, "--steps", 2, "--out", tmp_path / "g.png")
    assert r.exit_code == 0, r.output
    run = _copy_run(good_run, tmp_path / "cfg")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("train:\n", "train: 5\nold_train:\n", 1))
    assert "train: 5" in one_line_error(invoke("train", "--resume", run, "--steps", 3), 2)
    assert "empty" in one_line_error(invoke("fid", "", "digits", "--dims", 64), 2)
    assert "no dataset" in one_line_error(invoke("train", "--preset", "tiny", "--data", "", "--out", tmp_path / "nd"), 2)
    for value in ("train.lr=2", "train.weight_decay=1e308", "diffusion.logsnr_max=1e-300 --set diffusion.logsnr_min=0"):
        args = [a for v in value.split(" --set ") for a in ("--set", v)]
        one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "r", "--steps", 1, *args), 2)
    assert not (tmp_path / "r").exists()
    folder = _images(tmp_path / "home" / "imgs", n=3)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BDM_CACHE_DIR", "~/cache")
    monkeypatch.setenv("COLUMNS", "4")
    from bdm_cli import fid

    real = fid.inception(64, "random")
    monkeypatch.setattr(fid, "inception", lambda *a, **k: real)
    r = invoke("fid", "~/imgs", str(folder), "--dims", 64, "--workers", 0)
    assert r.exit_code == 0, r.output
    assert [line for line in r.output.splitlines() if line.startswith("FID: ")], r.output  # one line, not split
    assert (tmp_path / "home" / "cache" / "fid").is_dir() and not Path("~").exists()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("BDM_INCEPTION_WEIGHTS", raising=False)
    hub = tmp_path / "th" / "hub" / "checkpoints" / fid.FID_WEIGHTS_URL.rsplit("/", 1)[-1]
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"weights one")
    first = fid.weights_id(None)
    hub.write_bytes(b"weights two, other bytes")
    assert fid.weights_id(None) != first  # other weights in $TORCH_HOME are other statistics


def test_round_nine_environment_and_presets(good_run, tmp_path, monkeypatch):
    """Out of memory and a broken compiler toolchain are one line each; a wrong MPLBACKEND or a matplotlibrc in the
    working folder does not break schedule-plot; 'extends' that names nothing is refused, a run's config.yaml is a
    preset."""
    import bdm_cli.generate as gen

    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 107374182400 bytes.")

    monkeypatch.setattr(gen, "sample_batches", oom)
    assert "out of memory" in one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--out", tmp_path / "g.png"), 1)

    class InductorError(Exception):  # torch._inductor.exc's, as raised without a C++ compiler
        pass

    def no_compiler(*a, **k):
        raise InductorError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(gen, "sample_batches", no_compiler)
    assert "--compile" in one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--out", tmp_path / "g.png"), 1)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "nosuch")
    (tmp_path / "matplotlibrc").write_text("text.usetex : True\n")
    r = invoke("schedule-plot", "--preset", "tiny", "--out", tmp_path / "s.png")
    assert r.exit_code == 0 and (tmp_path / "s.png").is_file(), r.output
    for value in ("0", "false", '""'):
        (tmp_path / "p.yaml").write_text(f"extends: {value}\ntrain:\n  lr: 0.001\n")
        assert "extends" in one_line_error(invoke("schedule-plot", "--preset", tmp_path / "p.yaml", "--out", tmp_path / "t.png"), 2)
    r = invoke("schedule-plot", "--preset", good_run / "config.yaml", "--out", tmp_path / "t.png")  # a run's config
    assert r.exit_code == 0, r.output


def test_round_nine_files_changing_and_bytes_kept(good_run, tmp_path, monkeypatch):
    """Statistics of files that changed while they were read are not cached; a resume keeps the metrics lines it
    keeps byte for byte."""
    from bdm_cli import fid

    folder = _images(tmp_path / "imgs", n=4)
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "cache"))
    real = fid.features

    def changing(*a, **k):
        st = real(*a, **k)
        (folder / sorted(p.name for p in folder.iterdir())[0]).write_bytes(b"changed meanwhile")
        return st

    monkeypatch.setattr(fid, "features", changing)
    with pytest.warns(UserWarning, match="changed while it was read"):
        fid.stats_of(str(folder), fid.inception(64, "random"), dims=64, device="cpu", workers=0, weights_id="random")
    assert not list((tmp_path / "cache").rglob("*.npz"))
    run = _copy_run(good_run, tmp_path / "run")
    kept = '{"note": "caf\xe9"}\n'.encode("latin-1")
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes() + kept + b'{"step": 99}\n')
    assert invoke("train", "--resume", run, "--steps", 3).exit_code == 0
    assert kept in (run / "metrics.jsonl").read_bytes() and b'{"step": 99}' not in (run / "metrics.jsonl").read_bytes()
    import bdm_cli.train as tr

    def interrupted(*a, **k):  # Ctrl-C while the data statistics are computed, before the first checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "data_stats", interrupted)
    assert invoke("train", "--preset", "tiny", "--out", tmp_path / "ctrl" / "c", "--steps", 2).exit_code == 130
    assert not (tmp_path / "ctrl").exists()

    def terminated(*a, **k):  # SIGTERM at the same point (the default handler killed the process, leaving the folder)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tr, "data_stats", terminated)
    assert invoke("train", "--preset", "tiny", "--out", tmp_path / "term" / "c", "--steps", 2).exit_code == 143
    assert not (tmp_path / "term").exists()


# -- round ten: round nine's leftovers ------------------------------------------------------------------------------

def test_round_ten_files_that_are_no_files_and_yaml_that_is_no_config(tmp_path):
    """A folder or pipe as --preset or --inception-weights said "unknown preset"/"not found"; a run folder without a
    checkpoint named a checkpoint path; YAML merge keys and list keys (a TypeError traceback) in a preset."""
    folder, fifo = tmp_path / "d", tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(fifo)
    for path in (folder, fifo):
        assert "not a regular file" in one_line_error(invoke("train", "--preset", path, "--out", tmp_path / "r"), 2)
        msg = one_line_error(invoke("fid", "digits", "digits", "--dims", 64, "--inception-weights", path), 1)
        assert "not a regular file" in msg
    assert "preset file not found" in one_line_error(invoke("train", "--preset", tmp_path / "x.yaml"), 2)
    assert "neither a folder nor a regular file" in one_line_error(
        invoke("train", "--preset", "tiny", "--data", fifo, "--out", tmp_path / "r"), 1)
    assert "no such run folder" in one_line_error(invoke("train", "--resume", tmp_path / "nope"), 2)
    assert "not a folder" in one_line_error(invoke("train", "--resume", fifo), 2)
    for args in (("train", "--resume", folder), ("sample", "--run", folder, "--out", tmp_path / "g.png")):
        assert "holds no checkpoint.pt" in one_line_error(invoke(*args), 1)
    assert "run folder not found" in one_line_error(invoke("sample", "--run", tmp_path / "nope", "--out", tmp_path / "g.png"), 1)
    for text, words in (("train:\n  <<: {steps: 5}\n", "merge keys (<<) are not supported"),
                        ("train:\n  ? [a, b]\n  : 1\n", "a key must be a plain name")):
        (tmp_path / "p.yaml").write_text(text)
        assert words in one_line_error(invoke("train", "--preset", tmp_path / "p.yaml", "--out", tmp_path / "r"), 2)
    assert not (tmp_path / "r").exists()


def test_round_ten_messages_name_what_the_user_typed(good_run, tmp_path, monkeypatch):
    """`train --batch-size 0` named train.batch_size; resuming a CUDA run on a machine without CUDA blamed a
    --device cuda nobody typed; an output that may not be replaced (chattr +i, append-only) named bdm's temp file."""
    assert one_line_error(invoke("train", "--preset", "tiny", "--batch-size", 0, "--out", tmp_path / "r"), 2) \
        == "Error: --batch-size must be > 0, got 0"
    assert one_line_error(invoke("train", "--preset", "tiny", "--set", "train.batch_size=0", "--out", tmp_path / "r"), 2) \
        == "Error: train.batch_size must be > 0, got 0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = _copy_run(good_run, tmp_path / "cuda")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    before = state["config"]["train"]["device"]
    state["config"]["train"]["device"] = "cuda"
    torch.save(state, run / "checkpoint.pt")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(f"device: {before}", "device: cuda", 1))
    msg = one_line_error(invoke("train", "--resume", run, "--steps", 3), 1)
    assert "train.device cuda" in msg and "resume it here with --device cpu" in msg
    assert "--device cuda" in one_line_error(invoke("train", "--preset", "tiny", "--device", "cuda", "--out", tmp_path / "r"), 1)
    assert not (tmp_path / "r").exists()

    def refused(src, dst):
        raise PermissionError(1, "Operation not permitted")

    out = tmp_path / "locked.png"
    monkeypatch.setattr(os, "replace", refused)
    msg = one_line_error(invoke("schedule-plot", "--out", out), 1)
    assert f"cannot write {out}" in msg and "immutable or append-only" in msg and ".bdm.tmp" not in msg
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".bdm.tmp")]


def test_round_ten_attention_that_the_unet_lacks_is_a_warning(tmp_path):
    """model.attn_resolutions at a size no level has (16 on 8 px images) silently added no attention."""
    import warnings

    with pytest.warns(UserWarning, match=r"model.attn_resolutions 16: .*\(8, 4 px\)") as caught:
        r = invoke("train", "--preset", "tiny", "--steps", 1, "--set", "model.attn_resolutions=[4,16]", "--out", tmp_path / "r")
    assert r.exit_code == 0 and sum("attn_resolutions" in str(w.message) for w in caught) == 1, r.output
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the preset's own attention (4 px) fits
        r = invoke("train", "--preset", "tiny", "--steps", 1, "--out", tmp_path / "r2")
    assert r.exit_code == 0, r.output


def test_round_ten_a_matplotlibrc_with_bad_lines_prints_nothing(tmp_path):
    """schedule-plot ignores a matplotlibrc in the working folder; its bad lines were printed as matplotlib read it."""
    import subprocess
    import sys

    from .conftest import ROOT

    (tmp_path / "matplotlibrc").write_text("foo: bar\nlines.linewidth: abc\nthis is junk\n")
    p = subprocess.run([sys.executable, "-m", "bdm_cli", "schedule-plot", "--out", "s.png"], cwd=tmp_path, text=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert p.returncode == 0 and p.stderr == "" and p.stdout.strip() == "Wrote s.png", (p.stdout, p.stderr)


def test_round_ten_one_process_of_several_stops_on_ctrl_c(tmp_path):
    """WORLD_SIZE=2 with one process waited torch's 30 minutes in C++, deaf to Ctrl-C and SIGTERM."""
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        # Ctrl-C as a terminal delivers it: a test run started in the background (`make test &`) ignores SIGINT,
        # and its children inherit that (bdm then rightly keeps ignoring it, as Python does: the hung processes of
        # such a run had SIGINT in /proc's SigIgn)
        proc = subprocess.Popen([sys.executable, "-m", "bdm_cli", "train", "--preset", "tiny", "--out", str(tmp_path / "r")],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(6)  # well into the rendezvous
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == code, out
        assert "Traceback" not in out and not (tmp_path / "r").exists(), out


def test_round_ten_helper_findings(good_run, tmp_path, image_file):
    """The fresh round's cases: glued brackets in a list value trained another model ("[1][2]" became [12]); a
    trailing slash on a file output was dropped; --steps 0 "trained" an empty run and resuming a finished run
    rewrote its files; a zero-byte image's warning showed a file object's repr; a 1 x 50 picture previewed as one
    colour without a word."""
    from bdm_cli.config import load_config

    for value in ("[1][2]", "1)(2", "[1,2", "[[1]],[2]", "[1,,2]", ",1"):
        msg = one_line_error(invoke("train", "--preset", "tiny", "--set", f"model.channel_mult={value}", "--out", tmp_path / "r"), 2)
        assert "must be a list such as [1, 2]" in msg
    assert load_config("tiny", ["model.channel_mult=1,2"]).model.channel_mult == (1, 2)
    assert load_config("tiny", ["model.attn_resolutions=(4,)"]).model.attn_resolutions == (4,)
    for args in (("blur-preview", image_file, "--out", f"{tmp_path}/new.png/"), ("schedule-plot", "--csv", f"{tmp_path}/x/"),
                 ("sample", "--run", good_run, "--out", f"{tmp_path}/g.png/"),
                 ("fid", "digits", "digits", "--save-stats", f"{tmp_path}/s.npz/")):
        r = invoke(*args)  # Click's own usage error (one Error: line through the entry point, `run`)
        assert r.exit_code == 2 and "ends with a slash" in " ".join(r.output.replace("│", " ").split()), r.output
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("new.png", "x", "g.png", "s.npz")]
    assert "at least one step" in one_line_error(invoke("train", "--preset", "tiny", "--steps", 0, "--out", tmp_path / "r0"), 2)
    assert not (tmp_path / "r0").exists() and not (tmp_path / "r").exists()
    run = _copy_run(good_run, tmp_path / "done")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    r = invoke("train", "--resume", run)
    assert r.exit_code == 0 and "nothing to train" in r.output, r.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before
    (tmp_path / "zero.png").write_bytes(b"")
    msg = one_line_error(invoke("blur-preview", tmp_path / "zero.png", "--out", tmp_path / "z.png"), 1)
    assert "not an image format Pillow reads" in msg and "BufferedReader" not in msg
    Image.new("RGB", (1, 50), (200, 10, 10)).save(tmp_path / "thin.png")
    with pytest.warns(UserWarning, match="1 x 50 pixels: its centre square"):
        r = invoke("blur-preview", tmp_path / "thin.png", "--size", 16, "--out", tmp_path / "t.png")
    assert r.exit_code == 0, r.output


def test_round_ten_library_output_in_bdm_lines(good_run, tmp_path):
    """An OMP_NUM_THREADS libgomp cannot read printed two bare lines; torch.compile on a machine without CUDA logged
    torch's own "No CUDA runtime is found" line."""
    import subprocess
    import sys

    from .conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "0"}
    p = subprocess.run([sys.executable, "-m", "bdm_cli", "schedule-plot", "--out", str(tmp_path / "s.png")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "libgomp" not in p.stdout + p.stderr, (p.stdout, p.stderr)
    assert p.stderr.strip() == "Warning: OMP_NUM_THREADS='0' is not a positive whole number (or a list of them): ignored"
    assert p.stdout.strip() == f"Wrote {tmp_path / 's.png'}"
    code = ("import logging, sys; from bdm_cli import cli; cli._quiet_libraries(); "
            "from torch.utils import cpp_extension; sys.exit(logging.getLogger(cpp_extension.__name__).isEnabledFor(logging.WARNING))")
    assert subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"}, timeout=120).returncode == 0


# -- round eleven ---------------------------------------------------------------------------------------------------

def test_round_eleven_cli(good_run, tmp_path, image_file, monkeypatch):
    """A run folder scored as an image set (its preview grids), statistics whose feature rows do not fit n or are
    float16, an option and --set giving one value, a value twice in --compare, a misquoted --t, the wrong key
    blamed, --trajectory inside a missing --out-dir, a failed resume that had already rewritten the run's files,
    and a finished run's resume that skipped the checks of its options."""
    assert "is a bdm run folder: score its model with --run" in one_line_error(invoke("fid", good_run, "digits", "--dims", 64), 2)
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(30, 64)))  # Inception features are never negative
    np.savez(tmp_path / "rows.npz", mu=np.zeros(64), sigma=np.eye(64), n=5, feats=feats)
    assert "30 feature rows for n = 5" in one_line_error(invoke("fid", tmp_path / "rows.npz", "digits", "--dims", 64), 1)
    rows = np.tile(np.array([[2.0], [0.0], [2.0], [0.0]]), (1, 64))  # mean 1, variance 4/3
    f16 = dict(mu=np.ones(64, np.float16), sigma=np.full((64, 64), 4 / 3).astype(np.float16), n=4,  # columns alike
               feats=rows.astype(np.float16))
    np.savez(tmp_path / "f16.npz", **f16)  # float16 compared with 1e6 (the magnitude check) made numpy warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = invoke("fid", tmp_path / "f16.npz", tmp_path / "f16.npz", "--dims", 64)
    assert r.exit_code == 0 and "overflow" not in r.output, r.output
    np.savez(tmp_path / "s64.npz", mu=np.zeros(64), sigma=np.eye(64))
    assert "--dims 2048" in one_line_error(invoke("fid", tmp_path / "s64.npz", "digits"), 1)  # before digits' features
    msg = one_line_error(invoke("blur-preview", image_file, "--sigma-blur-max", 7, "--set", "diffusion.sigma_blur_max=5",
                                "--out", tmp_path / "b.png"), 2)
    assert "--sigma-blur-max and --set diffusion.sigma_blur_max both set it" in msg
    assert "twice" in one_line_error(invoke("schedule-plot", "--compare", "1000,0,1e3", "--out", tmp_path / "s.png"), 2)
    assert "got 1.0000000001" in one_line_error(invoke("blur-preview", image_file, "--t", "1.0000000001", "--out", tmp_path / "b.png"), 2)
    assert "sample.preview_steps must be" in one_line_error(invoke("train", "--preset", "tiny", "--set",
                                                                   "sample.preview_steps=0", "--out", tmp_path / "t"), 2)
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--out-dir", tmp_path / "od",
                                "--trajectory", tmp_path / "od" / "traj.png"), 2)
    assert "is inside --out-dir" in msg and not (tmp_path / "od").exists()
    run = _copy_run(good_run, tmp_path / "locked")
    before = _snapshot(run)

    def refused(path, flags, *args, **kwargs):
        if Path(path) == run / "checkpoint.pt" and flags & os.O_WRONLY:
            raise PermissionError(1, "Operation not permitted")
        return real_open(path, flags, *args, **kwargs)

    real_open = os.open
    monkeypatch.setattr(os, "open", refused)
    assert "cannot write" in one_line_error(invoke("train", "--resume", run, "--steps", 4), 1)
    monkeypatch.undo()
    assert _snapshot(run) == before  # config.yaml and metrics.jsonl as they were
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda" in one_line_error(invoke("train", "--resume", run, "--device", "cuda"), 1)
    assert "dataset not found" in one_line_error(invoke("train", "--resume", run, "--data", tmp_path / "nosuch"), 1)
    assert _snapshot(run) == before


@pytest.mark.parametrize("command", ["sample", "fid"])
def test_round_eleven_stopped_sampling_leaves_no_numbered_samples(good_run, tmp_path, command):
    """Ctrl-C or SIGTERM during `bdm sample --out-dir` / `bdm fid --run --out-dir` left a folder of the first
    samples, which then blocked the same command ("already holds 8 of the files"); fid's SIGTERM printed nothing."""
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    out = tmp_path / "made" / "samples"
    args = ["--run", str(good_run), "--n", "100000", "--batch-size", "2", "--steps", "2", "--out-dir", str(out)]
    args = ["sample", *args, "--out", str(tmp_path / "g.png")] if command == "sample" else \
        ["fid", *args, "--ref", "digits", "--dims", "64", "--inception-weights",
         str(shared_file("fid/pt_inception-2015-12-05.pth")), "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bdm_cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    end = time.time() + 120
    while not (out.is_dir() and len(list(out.glob("*.png"))) >= 4) and time.time() < end and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Interrupted" in output and "Traceback" not in output, output
    assert not (tmp_path / "made").exists() and not (tmp_path / "g.png").exists()


def test_round_eleven_engine_refuses_what_it_cannot_compute():
    """The documented functions gave NaN or plausible numbers for t outside [0, 1] (tan is periodic), s >= t, noise
    or model outputs of another shape (broadcast over channels), steps 0 or 2.5, integer DCT matrices (all zero),
    empty images, a string sigma_blur_max, one image's statistics (NaN) and constant data (ZeroDivisionError)."""
    from bdm_cli.engine import BlurSchedule, dct2, dct_matrix, denoise_mean_var, diffuse, sample, time_grid
    from bdm_cli.spectrum import band_masks, compare, image_statistics

    s = BlurSchedule(sigma_blur_max=2)
    x, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    zero = lambda z, t: torch.zeros_like(z)  # noqa: E731
    cases = [
        (lambda: diffuse(x, torch.full((4,), 3.0), noise, s), ValueError, "t must be in [0, 1]"),
        (lambda: diffuse(x, torch.full((4,), float("nan")), noise, s), ValueError, "t must be in [0, 1]"),
        (lambda: diffuse(x, torch.rand(4), noise[:, :1], s), ValueError, "noise must have x's shape"),
        (lambda: denoise_mean_var(x, 0.3, 0.6, noise, s), ValueError, "s < t"),
        (lambda: denoise_mean_var(x, 0.5, -0.2, noise, s), ValueError, "s must be in [0, 1]"),
        (lambda: time_grid(s, 0), ValueError, "steps must be a whole number"),
        (lambda: time_grid(s, 2.5), ValueError, "steps must be a whole number"),
        (lambda: dct_matrix(4, torch.int64), TypeError, "floating-point"),
        (lambda: dct_matrix(0), ValueError, "n must be a whole number between 1 and 8192"),
        (lambda: dct2(torch.zeros(2, 0, 0)), ValueError, "at least 1 x 1"),
        (lambda: BlurSchedule(sigma_blur_max="20"), TypeError, "finite number"),
        (lambda: sample(zero, noise, s, True), ValueError, "steps must be a whole number"),
        (lambda: sample(zero, noise, s, 2, denoised_range=[-1, 1]), TypeError, "pair of tensors"),
        (lambda: sample(lambda z, t: torch.zeros_like(z[:, :1]), noise, s, 2), ValueError, "the model returned shape"),
        (lambda: image_statistics(x[:1]), ValueError, "N >= 2"),
        (lambda: image_statistics(((x + 1) * 127).to(torch.uint8)), TypeError, "float images"),
        (lambda: compare(x, torch.zeros_like(x)), ValueError, "constant"),
        (lambda: band_masks(1, 1), ValueError, "at least 3 pixels"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call()
    assert diffuse(x, torch.rand(4), noise, s).shape == x.shape and time_grid(s, np.int64(3)).shape == (4,)


def test_round_twelve_a_stop_inside_a_batch_leaves_no_sample(tmp_path, monkeypatch):
    """Round eleven listed a batch's files after the whole batch was saved: a stop inside it left them (and could
    leave a temporary file); the folder's other files always stay."""
    from bdm_cli import cli, io

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    real, calls = io.save_image, [0]

    def stopped(image, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            (path.parent / f".{path.name}.abcd{io.TEMP_SUFFIX}").write_bytes(b"half")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(io, "save_image", stopped)
    for out_dir in (folder, tmp_path / "new" / "sub"):
        calls[0] = 0
        with pytest.raises(KeyboardInterrupt), cli._numbered_samples(out_dir) as save:
            save(torch.zeros(2, 1, 4, 4), 0)
            save(torch.zeros(3, 1, 4, 4), 2)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"] and not (tmp_path / "new").exists()


def test_round_twelve_engine():
    """eps_loss broadcast a model output of another shape into a finite loss; float16 sampling with blur was all
    NaN; data constant within each image passed the constant-data check by round-off."""
    from bdm_cli.engine import BlurSchedule, eps_loss, sample
    from bdm_cli.spectrum import compare

    s, x = BlurSchedule(sigma_blur_max=2), torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="the model returned"):
        eps_loss(lambda z, t: torch.zeros(2, 3, 8, 1), x, torch.rand(2), torch.randn_like(x), s)
    with pytest.raises(TypeError, match="float16"):
        sample(lambda z, t: torch.zeros_like(z), torch.randn(2, 3, 8, 8).half(), s, 3)
    assert sample(lambda z, t: torch.zeros_like(z), torch.randn(2, 3, 8, 8).half(), BlurSchedule(sigma_blur_max=0), 3).isfinite().all()
    with pytest.raises(ValueError, match="constant"):
        compare(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 1, 1).expand(4, 1, 8, 8))


def test_round_twelve_cli_names(tmp_path):
    """`--out .png` said "does not end in .png" (Path reads a hidden file without a suffix); attention at sizes
    below 1 px was only warned about."""
    r = invoke("schedule-plot", "--out", tmp_path / ".png")
    assert r.exit_code == 2 and "no name before its extension" in " ".join(r.output.replace("│", " ").split()), r.output
    assert "model.attn_resolutions must be feature map sizes" in one_line_error(
        invoke("train", "--preset", "tiny", "--set", "model.attn_resolutions=[-1, 0]", "--out", tmp_path / "r"), 2)
    assert not (tmp_path / "r").exists() and not (tmp_path / ".png").exists()


def test_round_thirteen_engine_arguments():
    """Round twelve's leftovers in the Python API: an unknown sampler in nfe (KeyError-free but silently 2 steps), time
    grids for sizes 0 or 8.5, band fractions outside (0, 0.5] (overlapping bands), statistics of images of other
    shapes compared, a [C, H, W] image or times of another count broadcast into more images, numpy arrays failing
    inside torch."""
    from bdm_cli.engine import BlurSchedule, dct2, denoise_mean_var, diffuse, nfe, time_grid
    from bdm_cli.spectrum import band_masks, compare, image_statistics

    s = BlurSchedule(sigma_blur_max=2)
    x, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    cases = [
        (lambda: nfe("bogus", 3), ValueError, "sampler must be one of"),
        (lambda: nfe("ddim", 0), ValueError, "steps must be a whole number"),
        (lambda: time_grid(s, 3, "spectral", (0, 8)), ValueError, "size's height and width"),
        (lambda: time_grid(s, 3, "spectral", (8.5, 8)), ValueError, "size's height and width"),
        (lambda: time_grid(s, 3, "spectral", 8), ValueError, "(height, width)"),
        (lambda: band_masks(8, 8, 0.7), ValueError, "fraction must be a number in (0, 0.5]"),
        (lambda: band_masks(8, 8, 0), ValueError, "fraction must be a number in (0, 0.5]"),
        (lambda: band_masks(8.0, 8), ValueError, "height must be a whole number"),
        (lambda: compare(x[:, :1], x), ValueError, "compare images of one shape"),
        (lambda: compare(torch.rand(4, 3, 4, 4), x), ValueError, "compare images of one shape"),
        (lambda: image_statistics(x.numpy()), TypeError, "float images"),
        (lambda: diffuse(x[0], torch.rand(1), noise[0], s), ValueError, "x must be [B, C, H, W]"),
        (lambda: diffuse(x[:1], torch.rand(4), noise[:1], s), ValueError, "x holds 1 images but 4 times were given"),
        (lambda: diffuse(x.numpy(), 0.5, noise.numpy(), s), TypeError, "x must be a torch.Tensor"),
        (lambda: diffuse(x, [0.5] * 4, noise, s), TypeError, "t must be a tensor or a number"),
        (lambda: denoise_mean_var(x, 0.5, 0.2, noise.numpy(), s), TypeError, "eps_hat must be a torch.Tensor"),
        (lambda: denoise_mean_var(x, torch.full((3,), 0.5), 0.2, noise, s), ValueError, "3 times were given"),
        (lambda: dct2(np.zeros((2, 4, 4))), TypeError, "need a torch.Tensor"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call()
    # what stays accepted: one time for the whole batch, numpy integers, a torch.Size
    assert diffuse(x, 0.5, noise, s).shape == x.shape and diffuse(x, np.float64(0.5), noise, s).shape == x.shape
    assert time_grid(s, 3, "spectral", torch.Size([8, 8])).shape == (4,) and nfe("heun", np.int64(3)) == 6
    assert band_masks(8, 8, 0.5)[0].sum() == 32


def test_round_thirteen_cli(tmp_path):
    """An empty path (an unset shell variable) was the current folder: `--out ""` said ". does not end in .png" or
    ". holds files"; `--out img.png/..` said the folder img.png does not exist; an unknown image extension was
    exit 1 in blur-preview and 2 in schedule-plot; `attn_resolutions=,` was an empty list; colour data trained as
    grey under a 1-channel preset without a word."""
    def words(r):
        return " ".join(r.output.replace("│", " ").split())

    for args in (("schedule-plot", "--out", ""), ("train", "--out", "", "--steps", 1), ("sample", "--run", ""),
                 ("blur-preview", "x.png", "--out", ""), ("fid", "digits", "--save-stats", "")):
        r = invoke(*args)
        assert r.exit_code == 2 and "is empty (an unset shell variable?)" in words(r), (args, r.output)
    r = invoke("schedule-plot", "--out", tmp_path / "img.png" / "..")
    assert r.exit_code == 2 and "names a folder (..)" in words(r), r.output
    image = _images(tmp_path / "imgs", n=1, size=16) / "0.png"
    assert "cannot tell the image format" in one_line_error(invoke("blur-preview", image, "--out", tmp_path / "x.xyz"), 2)
    assert "must be a list such as [1, 2]" in one_line_error(
        invoke("train", "--preset", "tiny", "--set", "model.attn_resolutions=,", "--out", tmp_path / "r"), 2)
    with pytest.warns(UserWarning, match=re.escape("holds colour images (RGB) and data.channels is 1")):
        r = invoke("train", "--preset", "tiny", "--data", _images(tmp_path / "colour", n=8, size=8), "--steps", 1,
                   "--out", tmp_path / "grey")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour", "grey", "imgs"]


def test_round_thirteen_data_read_as_it_is(tmp_path, monkeypatch):
    """Round thirteen's silent garbage in the data: YAML retyping a preset's dataset name, a Windows zip's split
    ignored, one bright pixel turning a float image black, FID reading 16-bit images as white, linked folders
    skipped, a resume from another folder training on another dataset, any cifar10 split read as train, statistics
    whose mu is not their features'."""
    from bdm_cli import fid
    from bdm_cli.config import ConfigError, load_config
    from bdm_cli.data import image_names, load_image, make_dataset

    (tmp_path / "p.yaml").write_text("extends: tiny\ndata:\n  dataset: 01\n")
    with pytest.raises(ConfigError, match=re.escape("data.dataset must be text, but YAML read the int 1 there")):
        load_config(str(tmp_path / "p.yaml"))
    png = io_bytes = (_images(tmp_path / "one", n=1, size=8) / "0.png").read_bytes()
    with zipfile.ZipFile(tmp_path / "win.zip", "w") as z:
        z.writestr("train\\0.png", io_bytes)
        z.writestr("test\\0.png", png)
    assert image_names(tmp_path / "win.zip", "train") == ["train\\0.png"]
    assert len(make_dataset(str(tmp_path / "win.zip"), 8, 3)) == 1
    flat = np.full((8, 8), 0.5, np.float32)
    flat[0, 0] = 1.01  # a highlight
    Image.fromarray(flat, "F").save(tmp_path / "f.tif")
    assert abs(load_image(tmp_path / "f.tif", 8, 1).mean().item()) < 0.02  # mid-grey, not black
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(deep / "0.png")  # 16-bit mid-grey
    assert abs(fid.ImageSource(deep)[0].mean().item() - 0.5) < 0.01
    assert abs(load_image(deep / "0.png", 8, 3).mean().item()) < 0.01
    linked = tmp_path / "linked"
    _images(linked / "cats", n=2)
    (linked / "dogs").symlink_to(_images(tmp_path / "elsewhere", n=2))
    (linked / "cats" / "loop").symlink_to(linked)  # a loop ends
    assert image_names(linked, "") == ["cats/0.png", "cats/1.png", "dogs/0.png", "dogs/1.png"]
    assert "splits train and test" in one_line_error(invoke("train", "--preset", "tiny", "--data", "cifar10", "--set",
                                                             "data.split=Test", "--out", tmp_path / "c"), 1)
    monkeypatch.chdir(_images(tmp_path / "p1" / "data", n=8, size=8).parent)
    assert invoke("train", "--preset", "tiny", "--data", "data", "--steps", 1, "--out", tmp_path / "rel").exit_code == 0
    saved = load_checkpoint(tmp_path / "rel" / "checkpoint.pt")["config"]["data"]["dataset"]
    assert saved == str(tmp_path / "p1" / "data")  # a resume from another folder reads these images
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(100, 64)))  # Inception features are never negative
    fid.save_stats(tmp_path / "ok.npz", feats.mean(0), np.cov(feats, rowvar=False), 100, feats)
    fid.read_stats(tmp_path / "ok.npz", 64)
    np.savez(tmp_path / "bad.npz", mu=feats.mean(0) + 5, sigma=np.cov(feats, rowvar=False), n=100, feats=feats)
    with pytest.raises(fid.UserError, match="not the statistics of its feats"):
        fid.read_stats(tmp_path / "bad.npz", 64)
    with pytest.raises(fid.UserError, match="not the statistics of its feats"):  # nor written (round twenty-four)
        fid.save_stats(tmp_path / "bad2.npz", feats.mean(0) + 5, np.cov(feats, rowvar=False), 100, feats)
    assert not (tmp_path / "c").exists()


def test_round_thirteen_run_files(good_run, tmp_path):
    """A metrics line cut short glued the next record onto it; replacing a file reset its mode; a hand-edited
    train.steps in config.yaml was ignored; a resume with another process count dropped its generators silently;
    a damaged optimizer state printed a Python object; a float seed past 2^53 was rounded."""
    import json

    from bdm_cli.config import ConfigError, load_config
    from bdm_cli.io import atomic_write
    from bdm_cli.train import _trim_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    _trim_metrics(metrics, 2)
    assert metrics.read_bytes() == b'{"step": 1, "loss": 0.5}\n'
    metrics.write_bytes(b'{"step": 1, "loss": 0.5}')
    _trim_metrics(metrics, 2)
    assert metrics.read_bytes() == b'{"step": 1, "loss": 0.5}\n'
    private = tmp_path / "private.bin"
    private.write_bytes(b"old")
    private.chmod(0o600)
    with atomic_write(private) as f:
        f.write(b"new")
    assert private.stat().st_mode & 0o777 == 0o600
    run = _copy_run(good_run, tmp_path / "edited")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("  steps: 2\n", "  steps: 3\n"))
    assert invoke("train", "--resume", run).exit_code == 0 and load_checkpoint(run / "checkpoint.pt")["step"] == 3
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    state = load_checkpoint(run / "checkpoint.pt")
    state["rng"] = {k: v * 2 for k, v in state["rng"].items()}  # as two processes saved it
    torch.save(state, run / "checkpoint.pt")
    with pytest.warns(UserWarning, match=re.escape("trained by 2 process(es) and resumes with 1")):
        assert invoke("train", "--resume", run, "--steps", 4).exit_code == 0
    state = load_checkpoint(run / "checkpoint.pt")
    state["opt"]["state"][0] = {"step": "x"}
    torch.save(state, run / "checkpoint.pt")
    msg = one_line_error(invoke("train", "--resume", run, "--steps", 5), 1)
    assert "optimizer state is damaged" in msg and " at 0x" not in msg
    with pytest.raises(ConfigError, match="rounded past 2"):
        load_config("tiny", ["train.seed=9007199254740993.0"])


def test_round_thirteen_names_and_messages(good_run, tmp_path, monkeypatch):
    """~ in presets and BDM_DATA_DIR, extends found in the current folder, preset names of only dots (a run in
    runs/..), .YAML, one look per --compare value, a checkpoint's missing section blamed on config.yaml, device names
    accepted by one command only, digits of other scripts, huge models, LAB images in grey, the digits
    reference at another size than the run's."""
    from bdm_cli import cli, data, fid
    from bdm_cli.config import ConfigError, load_config
    from bdm_cli.preview import LINE_STYLES

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.yaml").write_text("extends: tiny\ndiffusion:\n  sigma_blur_max: 7\n")
    assert load_config("~/mine.yaml").diffusion.sigma_blur_max == 7
    (tmp_path / "MINE.YAML").write_text("extends: tiny\n")
    assert load_config(str(tmp_path / "MINE.YAML")).preset == "MINE"
    (tmp_path / "ex" / "presets").mkdir(parents=True)
    (tmp_path / "ex" / "presets" / "a.yaml").write_text("extends: base.yaml\n")
    (tmp_path / "ex" / "base.yaml").write_text("extends: tiny\n")
    monkeypatch.chdir(tmp_path / "ex")
    with pytest.raises(ConfigError, match="preset file not found"):  # not ./base.yaml: beside a.yaml only
        load_config("presets/a.yaml")
    (tmp_path / "...yaml").write_text("extends: tiny\n")
    assert "no name before its extension" in one_line_error(invoke("train", "--preset", tmp_path / "...yaml"), 2)
    assert not (tmp_path / "ex" / "runs").exists()

    def offline(*args, **kwargs):
        raise OSError("no network")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("BDM_DATA_DIR", "~/x/y/z")
    with pytest.raises(data.DataError, match=re.escape(f"CIFAR-10 is not in {tmp_path}/x/y/z")):
        data.cifar10_uint8("train")
    assert not (tmp_path / "x").exists()
    assert len({tuple(sorted(s.items())) for s in LINE_STYLES}) >= cli.MAX_COMPARE
    run = _copy_run(good_run, tmp_path / "nomodel")
    state = load_checkpoint(run / "checkpoint.pt")
    del state["config"]["model"]
    torch.save(state, run / "checkpoint.pt")
    assert "has no model section" in one_line_error(invoke("train", "--resume", run, "--steps", 3))
    for args in (("sample", "--run", good_run, "--device", "cpu ", "--n", 1), ("sample", "--run", good_run, "--device",
                 "cuda:-1", "--n", 1), ("train", "--preset", "tiny", "--set", "train.steps=١٢", "--out", tmp_path / "u"),
                 ("schedule-plot", "--compare", "٠,١", "--out", tmp_path / "c.png"),
                 ("blur-preview", _images(tmp_path / "i", n=1) / "0.png", "--t", "0.5", "--t", "٠", "--out", tmp_path / "b.png"),
                 ("train", "--preset", "tiny", "--set", "model.channels=65536", "--out", tmp_path / "big")):
        one_line_error(invoke(*args), 2)
    lab = Image.new("LAB", (8, 8), (50, 10, 10))
    lab.save(tmp_path / "lab.tif")
    assert data.load_image(tmp_path / "lab.tif", 8, 1).shape == (1, 8, 8)
    asked = {}

    def stop(source, model, **kwargs):
        asked.update(kwargs)
        raise fid.UserError("stopped here")

    monkeypatch.setattr(fid, "inception", lambda *a, **k: None)
    monkeypatch.setattr(fid, "stats_of", stop)
    one_line_error(invoke("fid", "--run", good_run, "--ref", "digits", "--n", 2))
    assert asked["digits_size"] == 8  # the tiny preset's size, not the digits preset's 16
    assert fid._digits_uint8(8).shape[-2:] == (8, 8)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "MINE.YAML", "ex", "i", "lab.tif", "mine.yaml", "nomodel"]


def test_round_fourteen_data_and_checkpoints(good_run, tmp_path, monkeypatch):
    """A link up the tree read the dataset's parent (the run's own grids too); statistics with feats but no n, or a
    reservoir's n, escaped round thirteen's check; an optimizer state of another dtype trained on silently, one of
    another shape crashed torch's fused kernel, a negative second moment was blamed on the loss; config.yaml's 010
    was YAML 1.1's eight."""
    from bdm_cli import fid
    from bdm_cli.data import image_names

    data = _images(tmp_path / "lk" / "data", n=2)
    (data / "up").symlink_to("..")
    _images(tmp_path / "lk" / "sibling", n=3)
    with pytest.warns(UserWarning, match="a link to a folder that holds the dataset"):
        assert image_names(data, "") == ["0.png", "1.png"]
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(50, 64)))  # Inception features are never negative
    for n in (None, 20_000):
        np.savez(tmp_path / "s.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), feats=feats,
                 **({} if n is None else {"n": n}))
        with pytest.raises(fid.UserError, match="feature rows for n"):
            fid.read_stats(tmp_path / "s.npz", 64)
    for damage in ("dtype", "shape", "negative"):
        run = _copy_run(good_run, tmp_path / damage)
        state = load_checkpoint(run / "checkpoint.pt")
        for moments in state["opt"]["state"].values():
            moments["exp_avg_sq"] = {"dtype": lambda v: v.to(torch.int32), "shape": lambda v: v.flatten()[:1].clone(),
                                     "negative": lambda v: v - 1}[damage](moments["exp_avg_sq"])
        torch.save(state, run / "checkpoint.pt")
        before = (run / "checkpoint.pt").read_bytes()
        assert "optimizer state is damaged" in one_line_error(invoke("train", "--resume", run, "--steps", 3), 1)
        assert (run / "checkpoint.pt").read_bytes() == before
    run = _copy_run(good_run, tmp_path / "octal")
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("  steps: 2\n", "  steps: 010\n"))
    assert invoke("train", "--resume", run).exit_code == 0 and load_checkpoint(run / "checkpoint.pt")["step"] == 10


def test_round_fourteen_cli(tmp_path, monkeypatch):
    """Other scripts' digits and a bad port in torchrun's variables were tracebacks that left an empty run folder, an
    unknown MASTER_ADDR hung printing C++ log lines; an option and a --set of one key, a preset's `compile: false`,
    `preset: 5`, a file as BDM_DATA_DIR, a blank BDM_INCEPTION_WEIGHTS, `--compare ""`."""
    from bdm_cli.config import load_config

    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    for change, words in (({"RANK": "²"}, "torchrun's variables do not fit"), ({"WORLD_SIZE": "١"}, "do not fit"),
                          ({"MASTER_PORT": "notaport"}, "MASTER_PORT='notaport' is no port"),
                          ({"MASTER_PORT": "99999"}, "is no port"),
                          ({"MASTER_ADDR": "no.such.host.invalid"}, "cannot be resolved")):
        for key, value in {**env, **change}.items():
            monkeypatch.setenv(key, value)
        assert words in one_line_error(invoke("train", "--preset", "tiny", "--steps", 1, "--out", tmp_path / "r"), 1)
        assert not (tmp_path / "r").exists()
    for key in env:
        monkeypatch.delenv(key)
    assert "--steps and --set train.steps both set it" in one_line_error(
        invoke("train", "--preset", "tiny", "--steps", 6, "--set", "train.steps=5", "--out", tmp_path / "r"), 2)
    (tmp_path / "c.yaml").write_text("extends: tiny\ntrain:\n  compile: false\nsample:\n  sampler: unipc\n")
    assert load_config(str(tmp_path / "c.yaml")).train.compile == "false"
    (tmp_path / "p.yaml").write_text("extends: tiny\npreset: 5\n")
    assert "'preset' is the name of the preset" in one_line_error(invoke("schedule-plot", "--preset", tmp_path / "p.yaml"))
    assert "got 'UNIPC'" in one_line_error(invoke("train", "--preset", "tiny", "--set", "sample.sampler=UNIPC"), 2)
    assert "must be one of auto, true, false, got 'maybe'" in one_line_error(
        invoke("train", "--preset", "tiny", "--set", "train.compile=maybe"), 2)
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("BDM_DATA_DIR", str(tmp_path / "afile"))
    assert "is not a folder" in one_line_error(invoke("train", "--preset", "tiny", "--data", "cifar10", "--out", tmp_path / "r"))
    monkeypatch.setenv("BDM_INCEPTION_WEIGHTS", "  ")
    assert "BDM_INCEPTION_WEIGHTS is blank" in one_line_error(invoke("fid", _images(tmp_path / "i", n=2), tmp_path / "i"))
    assert "--compare is empty" in one_line_error(invoke("schedule-plot", "--compare", "", "--out", tmp_path / "s.png"), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "c.yaml", "i", "p.yaml"]


def test_round_fourteen_engine():
    """Complex, Fraction and meta times failed inside torch or inside the check itself; an int generator in len();
    a model's output on another device in torch; clip_denoised="no" clipped."""
    from fractions import Fraction

    from bdm_cli.engine import BlurSchedule, diffuse, sample

    s, x = BlurSchedule(sigma_blur_max=2), torch.rand(2, 1, 8, 8)
    zero = lambda z, t: torch.zeros_like(z)  # noqa: E731
    cases = [
        (lambda: diffuse(x, torch.rand(2, dtype=torch.complex64), x, s), TypeError, "t must be a real tensor"),
        (lambda: diffuse(x, torch.rand(2, device="meta"), x, s), TypeError, "meta"),
        (lambda: diffuse(x, Fraction(1, 2), x, s), TypeError, "t must be a tensor or a number"),
        (lambda: diffuse(x.to("meta"), 0.5, x.to("meta"), s), TypeError, "x is a meta tensor"),
        (lambda: sample(zero, x, s, 2, sampler="ancestral", generator=5), TypeError, "generator must be None"),
        (lambda: sample(zero, x, s, 2, generator=[torch.Generator()]), ValueError, "1 generators for a batch of 2"),
        (lambda: sample(lambda z, t: torch.zeros_like(z, device="meta"), x, s, 2), ValueError, "on meta for an input on cpu"),
        (lambda: sample(zero, x, s, 2, clip_denoised="no"), TypeError, "clip_denoised must be True or False"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call()


def test_round_fifteen_training_state(good_run, tmp_path):
    """The checkpoint's optimizer settings were trained on (a resume's --set train.weight_decay was recorded but
    not used; an edited amsgrad crashed, maximize ascended); a linked run folder inside the dataset fed its grids
    back; the metrics trim deleted a user's last line; a --set twice kept the last; the seed changed on resume."""
    import json

    from bdm_cli.data import image_names
    from bdm_cli.train import _trim_metrics

    run = _copy_run(good_run, tmp_path / "opt")
    state = load_checkpoint(run / "checkpoint.pt")
    state["opt"]["param_groups"][0].update(amsgrad=True, maximize=True, betas=(5.0, 0.999))
    torch.save(state, run / "checkpoint.pt")
    assert invoke("train", "--resume", run, "--steps", 3, "--set", "train.weight_decay=0.5").exit_code == 0
    group = load_checkpoint(run / "checkpoint.pt")["opt"]["param_groups"][0]
    assert (group["weight_decay"], group["amsgrad"], group["maximize"], tuple(group["betas"])) == (0.5, False, False, (0.9, 0.999))
    data = _images(tmp_path / "ds", n=2)
    (data / "more").symlink_to(good_run.parent)  # holds the run: checkpoint.pt, config.yaml, samples/
    with pytest.warns(UserWarning, match="a bdm run's folder"):
        assert image_names(data, "") == ["0.png", "1.png"]
    metrics = tmp_path / "metrics.jsonl"
    for text in (b'{"step": 1}\n# my note', b'{"step": 1}\n{"step": NaN, "note": "x"}\n'):
        metrics.write_bytes(text)
        _trim_metrics(metrics, 1)
        assert metrics.read_bytes() == text.rstrip(b"\n") + b"\n"
    assert "given twice" in one_line_error(invoke("train", "--preset", "tiny", "--set", "train.steps=2", "--set",
                                                  "train.steps=3", "--out", tmp_path / "r"), 2)
    assert "--seed cannot change on --resume: the run goes on" in one_line_error(invoke("train", "--resume", run, "--steps", 4,
                                                                           "--seed", 7), 2)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert not (tmp_path / "r").exists()


def test_round_fifteen_inputs(good_run, tmp_path):
    """YAML values that their tag cannot build (2023-02-29, !!int abc, !!bool maybe) were tracebacks; a 2-D n in
    statistics; statistics without .npz read as images; --size beside --set data.resolution; a run's config.yaml as
    a preset named its runs "config"; -0 shown as typed; cpu:0 refused; 0o17 refused where 0x10 was read."""
    from bdm_cli import fid
    from bdm_cli.config import load_config

    for value in ("2023-02-29", "!!int abc", "!!int", "!!bool maybe", "!!float abc", "!!timestamp 2020-13-45"):
        one_line_error(invoke("schedule-plot", "--preset", "tiny", "--set", f"train.steps={value}",
                              "--out", tmp_path / "s.png"), 2)
    (tmp_path / "d.yaml").write_text("extends: tiny\ndata:\n  dataset: 2023-02-29\n")
    assert "YAML" in one_line_error(invoke("schedule-plot", "--preset", tmp_path / "d.yaml", "--out", tmp_path / "s.png"))
    rng = np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(50, 64)))  # Inception features are never negative
    np.savez(tmp_path / "n2.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=np.array([[50]]), feats=feats)
    assert fid.read_stats(tmp_path / "n2.npz", 64)[2] == 50
    (tmp_path / "stats").write_bytes((tmp_path / "n2.npz").read_bytes())
    assert "holds FID statistics: name it .npz" in one_line_error(invoke("fid", tmp_path / "stats", tmp_path / "n2.npz"), 2)
    np.save(tmp_path / "plain.npy", feats)
    assert "neither a zip of images nor a .npz" in one_line_error(invoke("fid", tmp_path / "plain.npy", tmp_path / "n2.npz"))
    image = _images(tmp_path / "i", n=1) / "0.png"
    assert "--size and --set data.resolution both set it" in one_line_error(
        invoke("blur-preview", image, "--size", 16, "--set", "data.resolution=8", "--out", tmp_path / "b.png"), 2)
    assert load_config(str(good_run / "config.yaml")).preset == "tiny"
    r = invoke("blur-preview", image, "--t", "-0", "--sigma-blur-max", "-0", "--preset", "tiny", "--out", tmp_path / "b.png")
    assert r.exit_code == 0 and "-0" not in r.output, r.output
    assert invoke("sample", "--run", good_run, "--n", 1, "--steps", 1, "--device", "cpu:0", "--out", tmp_path / "g.png").exit_code == 0
    assert load_config("tiny", ["train.seed=0o17"]).train.seed == 15


def test_round_fifteen_engine():
    """Complex or boolean noise made complex or integer z_t; meta noise, eps or bounds failed inside torch; Fraction
    schedule fields failed at the first product; time_grid allocated 10^12 steps; delta NaN gave NaN variances."""
    from fractions import Fraction

    from bdm_cli.engine import BlurSchedule, denoise_mean_var, diffuse, sample, time_grid

    s, x = BlurSchedule(sigma_blur_max=2), torch.rand(2, 3, 8, 8)
    zero = lambda z, t: torch.zeros_like(z)  # noqa: E731
    lo, hi = -torch.ones(3, 8, 8), torch.ones(3, 8, 8)
    cases = [
        (lambda: diffuse(x, 0.5, torch.randn(2, 3, 8, 8, dtype=torch.complex64), s), TypeError, "noise must be a floating"),
        (lambda: diffuse(x, 0.5, torch.ones(2, 3, 8, 8, dtype=torch.bool), s), TypeError, "noise must be a floating"),
        (lambda: diffuse(x, 0.5, torch.randn(2, 3, 8, 8, device="meta"), s), TypeError, "noise is a meta tensor"),
        (lambda: denoise_mean_var(x, 0.5, 0.4, torch.ones_like(x, device="meta"), s), TypeError, "eps_hat is a meta"),
        (lambda: sample(zero, x, s, 2, denoised_range=(lo.to("meta"), hi.to("meta"))), TypeError, "meta tensor"),
        (lambda: time_grid(s, 10**12), ValueError, "steps must be a whole number between 1 and 4000"),
        (lambda: denoise_mean_var(x, 0.5, 0.4, x, s, delta=float("nan")), ValueError, "delta must be a number in (0, 1)"),
        (lambda: denoise_mean_var(x, 0.5, 0.4, x, s, delta="a"), ValueError, "delta must be a number"),
    ]
    for call, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call()
    fraction = BlurSchedule(sigma_blur_max=Fraction(1, 3), d_min=Fraction(1, 1000))
    assert fraction == BlurSchedule(sigma_blur_max=1 / 3) and diffuse(x, 0.5, x, fraction).isfinite().all()


def test_round_sixteen(good_run, tmp_path):
    """A mean_u of 1e30 sampled plausible grids; a data.split that no folder has trained on every image; statistics
    with n = -5 or True, or an all-zero sigma, were scored; float pixels of -5 or 1000 were clipped into a guess;
    a damaged generator state was called missing; a bad value in a checkpoint's config was a usage error naming
    nothing; a newline in the dataset's name broke the Training line."""
    from bdm_cli import fid
    from bdm_cli.data import DataError, image_names, load_image

    run = _copy_run(good_run, tmp_path / "mean")
    state = load_checkpoint(run / "checkpoint.pt")
    state["data_stats"]["mean_u"] = state["data_stats"]["max_u"] + 0.5  # possible for images, not for this data
    torch.save(state, run / "checkpoint.pt")
    assert "mean_u lies outside [min_u, max_u]" in one_line_error(invoke("sample", "--run", run, "--n", 2, "--out",
                                                                          tmp_path / "g.png"), 1)
    assert "digits has no splits" in one_line_error(invoke("train", "--preset", "tiny", "--set", "data.split=test",
                                                           "--out", tmp_path / "r"), 1)
    with pytest.raises(DataError, match="has no 'nonexistent' folder"):
        image_names(_images(tmp_path / "flat", n=2), "nonexistent")
    assert image_names(tmp_path / "flat", "train") == ["0.png", "1.png"]  # the default: every image
    feats = np.abs(np.random.default_rng(0).normal(size=(50, 64)))
    for extra in ({"n": -5}, {"n": True}, {"sigma": np.zeros((64, 64))}):
        np.savez(tmp_path / "s.npz", **{"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False), **extra})
        with pytest.raises(fid.UserError, match=r"n must be the number of images|nearly\) zero"):
            fid.read_stats(tmp_path / "s.npz", 64)
    for value in (-5.0, 1000.0):
        Image.fromarray(np.full((8, 8), value, np.float32)).save(tmp_path / "f.tif")
        with pytest.raises(DataError, match="outside"):
            load_image(tmp_path / "f.tif", 8, 1)
    run = _copy_run(good_run, tmp_path / "rng")
    state = load_checkpoint(run / "checkpoint.pt")
    state["rng"]["gen"] = 5
    torch.save(state, run / "checkpoint.pt")
    assert "holds a damaged optimizer or random-generator state" in one_line_error(invoke("train", "--resume", run, "--steps", 3), 1)
    state = load_checkpoint(good_run / "checkpoint.pt")
    state["config"]["sample"]["steps"] = 0
    run = _copy_run(good_run, tmp_path / "cfg")
    torch.save(state, run / "checkpoint.pt")
    msg = one_line_error(invoke("sample", "--run", run, "--n", 2, "--out", tmp_path / "g.png"), 1)
    assert "checkpoint.pt: its config is damaged" in msg
    odd = _images(tmp_path / "a\nb", n=8, size=8)
    r = invoke("train", "--preset", "tiny", "--data", odd, "--steps", 1, "--out", tmp_path / "nl")
    assert r.exit_code == 0 and "a\\nb" in r.output, r.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "g.png").exists()


def test_round_seventeen(good_run, tmp_path):
    """Statistics with negative (post-ReLU) features or a near-zero sigma were scored; a checkpoint's var_u, min_u and
    max_u of 1e30 sampled, a step of 2^70 was printed, a text 'format' was "a newer bdm"; a path under a file blamed
    a missing folder (or, for --out-dir, failed after sampling); --out-dir joined a new set to an old one's files;
    result lines printed names raw (newlines, terminal escapes, \\udcff); KID printed "± 0 over 100 subsets" of two
    whole sets; d_min = 1 turned the blur off silently; a zip inside the dataset was not named; the engine took
    sparse tensors, times shaped [2, 2] for 4 images, and numpy numbers torch cannot convert."""
    import typer

    from bdm_cli import cli, fid
    from bdm_cli.engine import BlurSchedule, diffuse, sample
    from bdm_cli.errors import INTERRUPTED

    feats = np.abs(np.random.default_rng(0).normal(size=(50, 64)))
    for bad, words in (({"mu": feats.mean(0) - 5}, "never negative"), ({"sigma": np.eye(64) * 1e-12}, "nearly) zero")):
        np.savez(tmp_path / "s.npz", **{"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False), "n": 50, **bad})
        assert words in one_line_error(invoke("fid", tmp_path / "s.npz", tmp_path / "s.npz", "--dims", 64), 1)
    np.savez(tmp_path / "f.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), n=50, feats=feats)
    r = invoke("fid", tmp_path / "f.npz", tmp_path / "f.npz", "--dims", 64)
    assert r.exit_code == 0 and "the whole sets, 50 images each" in r.output and "±" not in r.output, r.output
    for key, value, words in (("var_u", 1e30, "data_stats.var_u reaches"), ("max_u", 1e30, "data_stats.max_u reaches"),
                              ("step", 2**70, "'step' is not a count"), ("format", "1", "'format' is not a version")):
        run = _copy_run(good_run, tmp_path / key)
        state = load_checkpoint(run / "checkpoint.pt")
        if key in ("var_u", "max_u"):
            state["data_stats"][key] = torch.full_like(state["data_stats"][key], value)
        else:
            state[key] = value
        torch.save(state, run / "checkpoint.pt")
        assert words in one_line_error(invoke("sample", "--run", run, "--n", 2, "--out", tmp_path / "g.png"), 1)
    (tmp_path / "afile").write_text("x")
    for args in (("sample", "--run", good_run, "--n", 2, "--out", tmp_path / "afile" / "x.png"),
                 ("sample", "--run", good_run, "--n", 2, "--out-dir", tmp_path / "afile" / "sub"),
                 ("train", "--preset", "tiny", "--out", tmp_path / "afile" / "run"),
                 ("schedule-plot", "--preset", "tiny", "--csv", tmp_path / "afile" / "x.csv")):
        msg = one_line_error(invoke(*args))
        assert f"{tmp_path / 'afile'} is a file, not a directory" in msg, msg
    od = tmp_path / "od"
    assert invoke("sample", "--run", good_run, "--n", 5, "--steps", 1, "--out-dir", od).exit_code == 0
    for name in ("000000.png", "000001.png"):
        (od / name).unlink()
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--steps", 1, "--seed", 5, "--out-dir", od), 2)
    assert "already holds 3 numbered samples" in msg and "mixed set" in msg
    odd = tmp_path / "a\n\x1b[1mb.png"
    r = invoke("sample", "--run", good_run, "--n", 2, "--steps", 1, "--out", odd)
    assert r.exit_code == 0 and "a\\n\\x1b[1mb.png" in r.output and "\x1b" not in r.output, r.output
    r = invoke("schedule-plot", "--preset", "tiny", "--out", tmp_path / "s.png", "--csv", os.fsdecode(bytes(tmp_path) + b"/c\xff.csv"))
    assert r.exit_code == 0 and "c\\xff.csv" in r.output and "udcff" not in r.output, r.output
    assert "1 is no blur" in one_line_error(invoke("schedule-plot", "--preset", "tiny", "--set", "diffusion.d_min=1"), 2)
    with zipfile.ZipFile(tmp_path / "outer.zip", "w") as z:
        z.writestr("inner.zip", b"PK")
    msg = one_line_error(invoke("train", "--preset", "tiny", "--data", tmp_path / "outer.zip", "--out", tmp_path / "rz"), 1)
    assert "holds 1 .zip file" in msg and not (tmp_path / "rz").exists()
    s, x = BlurSchedule(sigma_blur_max=1), torch.randn(4, 3, 8, 8)
    cases = [(lambda: sample(lambda z, t: z, x.to_sparse(), s, 2), TypeError, "dense tensor"),
             (lambda: diffuse(x, torch.rand(2, 2), x, s), ValueError, "1-D tensor"),
             (lambda: diffuse(x, np.longdouble(0.5), x, s), TypeError, "cannot convert"),
             (lambda: diffuse(x, np.uint64(1), x, s), TypeError, "cannot convert")]
    for call, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call()
    assert diffuse(x, np.float32(0.5), x, s).shape == x.shape
    INTERRUPTED.set()  # a Ctrl-C inside an import: the module's own error on its next import reads as the stop
    try:
        with pytest.raises(typer.Exit) as e, cli.user_errors():
            raise ImportError("cannot load module more than once per process")
        assert e.value.exit_code == 130
    finally:
        INTERRUPTED.clear()


def test_round_seventeen_stderr_on_a_full_disk(good_run, tmp_path):
    """Standard error on a full disk (2>/dev/full): sampling stopped with exit 1 and wrote nothing, silently, and a
    training that had finished exited 1. Progress and warnings are dropped now; the work and the exit code stand."""
    import subprocess
    import sys

    from .conftest import ROOT

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "bdm_cli", "sample", "--run", str(good_run), "--n", "2", "--steps", "1",
                            "--out", str(tmp_path / "g.png")], cwd=ROOT, timeout=300, stdout=subprocess.PIPE, stderr=full,
                           text=True)
    assert p.returncode == 0 and (tmp_path / "g.png").is_file() and "Wrote" in p.stdout, p.stdout


def test_round_eighteen(good_run, tmp_path):
    """FID of NaN statistics was 0 (max(0, nan)); bounds finite in float64 but not in the noise's float32 made every
    sample NaN, as did d_min = 1e-300; a callback that changed Step.x_u in place changed the samples; images smaller
    than data.resolution trained as flat squares without a word, and identical images trained at all; a resume
    after the dataset changed said nothing; dct2 of a 1 x 50000 strip asked for 20 GB; a meta dct2, grid "" or 0,
    a float KID subset size, statistics dicts without their keys, 0..255 float images and a negative checkpoint
    format passed or failed inside torch/numpy."""
    from bdm_cli.data import TensorImages
    from bdm_cli.engine import BlurSchedule, dct2, sample
    from bdm_cli.errors import UserError
    from bdm_cli.fid import frechet_distance, kernel_distance
    from bdm_cli.spectrum import compare, image_statistics
    from bdm_cli.train import data_stats

    s, zero = BlurSchedule(sigma_blur_max=2), (lambda z, t: torch.zeros_like(z))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    huge = torch.full((1, 8, 8), 1e300, dtype=torch.float64)
    cases = [(lambda: frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3)), UserError, "not finite"),
             (lambda: frechet_distance(np.zeros(3), np.eye(2), np.ones(3), np.eye(2)), UserError, "different dimensions"),
             (lambda: sample(zero, noise, s, 2, denoised_range=(-huge, huge)), ValueError, "must be finite"),
             (lambda: BlurSchedule(sigma_blur_max=1000, d_min=1e-300), ValueError, "d_min must be in [1e-6, 1)"),
             (lambda: dct2(torch.rand(1, 1, 1, 50000)), ValueError, "sides up to 8192"),
             (lambda: dct2(torch.rand(2, 2, device="meta")), TypeError, "meta tensor"),
             (lambda: sample(zero, noise, s, 2, sampler="unipc", grid=""), ValueError, "grid must be one of"),
             (lambda: kernel_distance(np.ones((5, 3)), np.ones((5, 3)), subset_size=2.5), UserError, "whole number"),
             (lambda: compare({"shape": (1, 8, 8)}, torch.rand(3, 1, 8, 8)), ValueError, "statistics lack"),
             (lambda: image_statistics(torch.rand(3, 1, 8, 8) * 255), ValueError, "x / 127.5 - 1"),
             (lambda: data_stats(TensorImages(torch.zeros(4, 1, 8, 8))), UserError, "all the same")]
    for call, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            call()
    plain = sample(zero, noise, s, 3, sampler="ddim")
    assert torch.equal(sample(zero, noise, s, 3, sampler="ddim", callback=lambda st: st.x_u.mul_(0)), plain)
    run = _copy_run(good_run, tmp_path / "fmt")
    state = load_checkpoint(run / "checkpoint.pt")
    state["format"] = -7
    torch.save(state, run / "checkpoint.pt")
    assert "'format' is not a version number" in one_line_error(invoke("sample", "--run", run, "--n", 2, "--out", tmp_path / "g.png"), 1)
    thin = tmp_path / "thin"
    thin.mkdir()
    for i in range(8):
        Image.new("L", (1, 100), i * 30).save(thin / f"{i}.png")
    with pytest.warns(UserWarning, match=re.escape("smaller than data.resolution 8 (such as 1 x 100)")):
        assert invoke("train", "--preset", "tiny", "--data", thin, "--steps", 1, "--out", tmp_path / "rt").exit_code == 0
    data = _images(tmp_path / "ds", n=12, size=8)
    assert invoke("train", "--preset", "tiny", "--data", data, "--steps", 1, "--out", tmp_path / "rd").exit_code == 0
    for p in sorted(data.iterdir())[:3]:
        p.unlink()
    with pytest.warns(UserWarning, match=re.escape("the dataset changed since the run started (12 images")):
        assert invoke("train", "--resume", tmp_path / "rd", "--steps", 2).exit_code == 0


def test_round_nineteen(tmp_path):
    """A sigma cut to its diagonal passed the check against its feats (and changed FID); --dims was checked only
    where the Inception loads, so two .npz inputs took --dims -64 (blaming a good file) or 100."""
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(64, 64)) / 8 + np.eye(64)
    feats = np.abs(rng.normal(size=(500, 64)) @ mix)
    sigma = np.cov(feats, rowvar=False)
    np.savez(tmp_path / "full.npz", mu=feats.mean(0), sigma=sigma, n=500, feats=feats.astype(np.float32))
    np.savez(tmp_path / "diag.npz", mu=feats.mean(0), sigma=np.diag(np.diag(sigma)), n=500, feats=feats.astype(np.float32))
    assert "not the statistics of its feats" in one_line_error(invoke("fid", tmp_path / "diag.npz", tmp_path / "full.npz",
                                                                      "--dims", 64), 1)
    r = invoke("fid", tmp_path / "full.npz", tmp_path / "full.npz", "--dims", 64)
    assert r.exit_code == 0 and "FID: 0.0000" in r.output, r.output
    for dims in (-64, 0, 100):
        msg = one_line_error(invoke("fid", tmp_path / "full.npz", tmp_path / "full.npz", "--dims", dims), 2)
        assert f"--dims must be one of 64, 192, 768, 2048, got {dims}" in msg


def test_a_lost_ctrl_c_still_stops(good_run, tmp_path):
    """A KeyboardInterrupt raised inside an import that torch's C start-up runs was cleared there: the command went
    on, and one process of several then waited at the rendezvous for good (CI caught it on a fresh clone). The CLI's
    handler also records the Ctrl-C (errors.INTERRUPTED); training and sampling stop on it before any work."""
    from bdm_cli.errors import INTERRUPTED
    from bdm_cli.generate import load_run, sample_batches

    run = load_run(good_run / "checkpoint.pt")
    INTERRUPTED.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            next(sample_batches(run, 2))
        r = invoke("train", "--preset", "tiny", "--steps", 2, "--out", tmp_path / "r")
        assert r.exit_code == 130 and "Interrupted" in r.output and not (tmp_path / "r").exists(), r.output
    finally:
        INTERRUPTED.clear()


def test_round_twenty(good_run, tmp_path):
    """A file named samples/ in a run folder was found after the start was announced (``File exists``); an empty
    preset trained the defaults under its name; hand-edited data_stats whose range had collapsed to the mean (every
    sample the mean image) or whose variance was all but zero loaded; NaN noise sampled to NaN without a word."""
    from bdm_cli.engine import BlurSchedule, sample

    run = _copy_run(good_run, tmp_path / "run")
    (run / "samples").write_text("x")  # _copy_run copies no samples/
    before = _snapshot(run)
    r = invoke("train", "--resume", run, "--steps", 3)
    assert "is not a folder (bdm train writes its samples there)" in one_line_error(r, 2) and "Training" not in r.output
    assert _snapshot(run) == before
    for text in ("", "# nothing yet\n", "\n\n"):
        (tmp_path / "empty.yaml").write_text(text)
        msg = one_line_error(invoke("train", "--preset", tmp_path / "empty.yaml", "--out", tmp_path / "e"), 2)
        assert "the preset is empty" in msg and not (tmp_path / "e").exists()
    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert invoke("schedule-plot", "--preset", tmp_path / "defaults.yaml", "--out", tmp_path / "d.png").exit_code == 0
    good = load_checkpoint(good_run / "checkpoint.pt")
    for edit, words in ((lambda s: s.update(min_u=s["mean_u"].clone(), max_u=s["mean_u"].clone()), "exceeds what the range"),
                        (lambda s: s.update(var_u=torch.full_like(s["var_u"], 1e-30)), "all but zero")):
        state = load_checkpoint(good_run / "checkpoint.pt")
        edit(state["data_stats"])
        torch.save(state, tmp_path / "edited.pt")
        assert words in one_line_error(invoke("sample", "--checkpoint", tmp_path / "edited.pt", "--n", 2,
                                              "--out", tmp_path / "g.png"), 1)
        assert not (tmp_path / "g.png").exists()
    torch.save(good, tmp_path / "same.pt")  # the unedited statistics still load
    assert invoke("sample", "--checkpoint", tmp_path / "same.pt", "--n", 2, "--steps", 2, "--out", tmp_path / "g.png").exit_code == 0
    noise = torch.randn(2, 3, 8, 8)
    noise[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="noise must be finite"):
        sample(lambda z, t: z, noise, BlurSchedule(sigma_blur_max=1), 2)


def test_round_twenty_one(tmp_path, monkeypatch):
    """Identical images and absurd (finite) Inception weights were scored, cached and saved as statistics that bdm's
    own reader then refused; an output in a folder that takes no files (/proc) named bdm's temporary file; torchrun's
    forwarded Ctrl-C (a second SIGINT within milliseconds) stopped the ranks at once, without a checkpoint; standard
    output on a full disk said only "No space left on device"; the exported engine helpers lacked the engine's
    checks; a killed FID cache write left its temporary file for good."""
    import errno
    import tempfile
    import time as time_module

    from bdm_cli.engine import BlurSchedule, dct_matrix, default_grid, gaussian_eps, posterior_coefficients, precondition, randn
    from bdm_cli.errors import UserError
    from bdm_cli.io import TEMP_SUFFIX, atomic_write
    from bdm_cli.train import SECOND_CTRL_C_AFTER, _Stop

    weights = shared_file("fid/pt_inception-2015-12-05.pth")
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "cache"))
    same, other = tmp_path / "same", tmp_path / "other"
    same.mkdir(), other.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40, np.uint8)).save(same / f"{i}.png")
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(other / f"{i}.png")
    msg = one_line_error(invoke("fid", same, same, "--dims", 64, "--inception-weights", weights,
                                "--save-stats", tmp_path / "s.npz"), 1)
    assert "are its images all the same?" in msg and not (tmp_path / "s.npz").exists()
    assert not list((tmp_path / "cache").rglob("*.npz"))
    state = torch.load(weights, weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "zero.pth")
    msg = one_line_error(invoke("fid", other, other, "--dims", 64, "--inception-weights", tmp_path / "zero.pth"), 1)
    assert "--inception-weights" in msg
    # a folder that takes no new files: the error names the output
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", refuse)
        with pytest.raises(UserError, match=f"cannot write {re.escape(str(tmp_path / 'o.png'))}: Read-only file system"):
            with atomic_write(tmp_path / "o.png"):
                pass
    # Ctrl-C: the first stops with a checkpoint; its echo within a second is the same stop; a later one interrupts
    stop = _Stop()
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)
    assert stop.requested == "SIGINT"
    stop._at = time_module.monotonic() - SECOND_CTRL_C_AFTER - 0.1
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    # the exported helpers check what the rest of the engine checks
    s, z = BlurSchedule(sigma_blur_max=1), torch.randn(2, 3, 8, 8)
    mean, var = torch.zeros(3, 8, 8), torch.ones(3, 8, 8)
    for call, err in ((lambda: gaussian_eps(z, 2.0, s, mean, var), "in \\[0, 1\\]"),
                      (lambda: gaussian_eps(z, 0.5, s, mean, -var), "positive"),
                      (lambda: gaussian_eps(z, 0.5, s, mean[:, :4, :4], var[:, :4, :4]), "images' \\[C, H, W\\]"),
                      (lambda: gaussian_eps(z, 0.5, s, mean[:1], var[:1]), "images' \\[C, H, W\\]"),
                      (lambda: precondition(lambda z, t: z, s, mean[:1], var), "must both be"),
                      (lambda: posterior_coefficients(*map(torch.tensor, (0.9, 0.3, 0.5, 0.8))), "s before t"),
                      (lambda: randn((2, -1, 4, 4)), "whole numbers >= 1"), (lambda: randn(()), "whole numbers >= 1"),
                      (lambda: randn((2, 3), dtype=torch.int64), "real floating point"),
                      (lambda: randn((2, 3), dtype=torch.complex64), "real floating point"),
                      (lambda: randn((2, 3), device="meta"), "meta"), (lambda: dct_matrix(4, device="meta"), "meta"),
                      (lambda: default_grid("bogus"), "sampler must be one of"), (lambda: default_grid(None), "sampler must be")):
        with pytest.raises((ValueError, TypeError), match=err):
            call()
    assert gaussian_eps(z, 0.5, s, mean, var).shape == z.shape
    c = posterior_coefficients(*map(torch.tensor, (0.9, 0.3, 0.95, 0.2)))
    assert all(torch.isfinite(v).all() for v in c)
    # a killed writer's temporary file in the FID cache goes once it is an hour old; a fresh one (a write in
    # progress) stays
    cache = tmp_path / "cache" / "fid"
    cache.mkdir(parents=True, exist_ok=True)
    old, fresh = cache / f".a.npz.x{TEMP_SUFFIX}", cache / f".b.npz.y{TEMP_SUFFIX}"
    old.write_bytes(b"x"), fresh.write_bytes(b"y")
    os.utime(old, (time_module.time() - 7200,) * 2)
    r = invoke("fid", other, tmp_path / "other", "--dims", 64, "--inception-weights", weights)
    assert r.exit_code == 0, r.output
    assert not old.exists() and fresh.exists()


def test_round_twenty_one_environment(tmp_path):
    """Standard output on a full disk said only "No space left on device" (the plot was written); a removed current
    folder ended every command with MKL's bare "FATAL ERROR: Cannot load libtorch_cpu.so"."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "bdm_cli", "schedule-plot", "--preset", "tiny", "--out", tmp_path / "p.png"],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().startswith("Error: cannot write to standard output (No space left"), p.stderr
    assert "Traceback" not in p.stderr and (tmp_path / "p.png").is_file()
    p = subprocess.run(["bash", "-c", f'mkdir d && cd d && rmdir ../d && exec "{sys.executable}" -m bdm_cli presets'],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip() == ("Error: the current folder no longer exists (it was removed or "
                                                      "moved): cd to another folder"), p.stderr


def test_round_twenty_two(tmp_path):
    """Round twenty-one's stdout-on-a-full-disk error escaped as a traceback from --help and --version, and left an
    empty run folder when the training's first line could not be printed; engine helpers refused valid inputs
    (numbers, numpy integers, a float64 colour basis, dtype None) or named NaN as an order problem."""
    import subprocess
    import sys

    from bdm_cli.engine import BlurSchedule, dct_matrix, gaussian_eps, posterior_coefficients, randn

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for args in (("--help",), ("--version",), ("train", "--help"), ("train", "--preset", "tiny", "--out", str(tmp_path / "r"))):
        with open("/dev/full", "w") as full:
            p = subprocess.run([sys.executable, "-m", "bdm_cli", *args], stdout=full, stderr=subprocess.PIPE, text=True,
                               env=env, timeout=300)
        assert p.returncode == 1 and p.stderr.startswith("Error: cannot write to standard output"), (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()
    s, z = BlurSchedule(sigma_blur_max=2), torch.randn(3, 3, 8, 8)
    basis = torch.linalg.qr(torch.randn(8, 8, 3, 3))[0].permute(2, 3, 0, 1).contiguous()
    eps = gaussian_eps(z, torch.tensor([0.2, 0.5, 0.9]), s, torch.zeros(3, 8, 8).double(), torch.ones(3, 8, 8).double(),
                       basis.double())
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="basis_u must be finite"):
        gaussian_eps(z, 0.5, s, torch.zeros(3, 8, 8), torch.ones(3, 8, 8), basis * float("nan"))
    assert all(torch.isfinite(v).all() for v in posterior_coefficients(0.9, 0.3, 0.95, 0.2))
    assert all(torch.isfinite(v).all() for v in posterior_coefficients(np.array([0.9]), 0.3, 0.95, np.array([0.2])))
    with pytest.raises(ValueError, match="finite alphas and sigmas"):
        posterior_coefficients(float("nan"), 0.3, 0.95, 0.2)
    assert randn((np.int64(2), 3)).shape == (2, 3) and randn((2, 3), dtype=None).dtype == torch.get_default_dtype()
    assert dct_matrix(4, dtype=None, device=None).dtype == torch.float64


def test_round_twenty_three(good_run, tmp_path, monkeypatch):
    """Round twenty-three (after the torchrun fixes): the library's sample_batches, kernel_distance, load_config,
    from_dict and diffuse took bad values silently or failed inside Python; a log-SNR range that never reaches noise
    (or never nearly clean images) trained and sampled; --trajectory showed only the first batch's samples; fid's
    offline CIFAR-10 message named train's --data; one KID subset printed a std of 0; a dangling link was a "file"."""
    import torchvision.datasets

    from bdm_cli import fid
    from bdm_cli.config import ConfigError, from_dict, load_config
    from bdm_cli.engine import BlurSchedule, diffuse
    from bdm_cli.generate import load_run, sample_batches

    r = load_run(good_run / "checkpoint.pt", device="cpu")
    for kwargs, message in ((dict(n=1, steps=0), "steps must be"), (dict(n=-1), "n must be"), (dict(n=2.5), "n must be"),
                            (dict(n=2, batch_size=0), "batch_size must be"), (dict(n=1, seed=-1), "seed must be"),
                            (dict(n=1, seed=2**64), "seed must be")):
        with pytest.raises(ValueError, match=message):
            next(sample_batches(r, **kwargs))
    assert list(sample_batches(r, 0)) == []
    with pytest.raises(fid.UserError, match="not finite"):
        fid.kernel_distance(np.full((5, 4), np.nan), np.random.rand(5, 4))
    with pytest.raises(fid.UserError, match="2-D"):
        fid.kernel_distance(np.random.rand(5), np.random.rand(5))
    with pytest.raises(TypeError, match="list of 'section.key=value' strings"):
        load_config("tiny", "model.channels=16")
    with pytest.raises(TypeError, match="got 1"):
        load_config("tiny", [1])
    with pytest.raises(ConfigError, match="mapping of sections"):
        from_dict([1, 2])
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="x must be finite"):
        diffuse(x * float("nan"), 0.5, x, BlurSchedule())
    with pytest.raises(ValueError, match="noise must be finite"):
        diffuse(x, 0.5, x * float("inf"), BlurSchedule())
    for low, high in ((49, 50), (-50, -49), (-4, 10), (-10, 4)):
        with pytest.raises(ValueError, match=r"logsnr_min must be in \[-50, -5\]"):
            BlurSchedule(logsnr_min=low, logsnr_max=high)
        msg = one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "x", "--set",
                                    f"diffusion.logsnr_min={low}", "--set", f"diffusion.logsnr_max={high}"), 2)
        assert "logsnr_min must be in [-50, -5]" in msg
    assert not (tmp_path / "x").exists()
    BlurSchedule(logsnr_min=-5, logsnr_max=13.3)  # VDM's range
    from bdm_cli.engine import precondition

    skip = precondition(lambda z, t: torch.zeros_like(z), BlurSchedule(), torch.zeros(3, 8, 8), torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="2 images but 3 times"):
        skip(x, torch.tensor([0.1, 0.5, 0.2]))
    strips = {}
    for b in (3, 64):
        out = tmp_path / f"tr{b}.png"
        res = invoke("sample", "--run", good_run, "--n", 20, "--batch-size", b, "--trajectory", out, "--out",
                     tmp_path / f"g{b}.png", "--device", "cpu")
        assert res.exit_code == 0, res.output
        strips[b] = np.asarray(Image.open(out))
    assert strips[3].shape == strips[64].shape and (strips[3] == strips[64]).all()  # 8 samples, whatever the batch

    def offline(root, **kw):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("BDM_DATA_DIR", str(tmp_path / "nodata"))
    monkeypatch.setenv("BDM_CACHE_DIR", str(tmp_path / "cache"))
    real = fid.inception(64, "random")
    monkeypatch.setattr(fid, "inception", lambda *a, **k: real)
    a = _images(tmp_path / "a", n=3)
    msg = one_line_error(invoke("fid", "cifar10-test", a, "--dims", 64, "--workers", 0), 1)
    assert "as the input instead" in msg and "--data" not in msg
    b = _images(tmp_path / "b", n=5, size=14)
    res = invoke("fid", a, b, "--dims", 64, "--workers", 0, "--kid-subset-size", 2, "--kid-subsets", 1)
    assert res.exit_code == 0 and "one subset of 2 images: no spread" in res.output and "±" not in res.output, res.output
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "c").symlink_to("../nowhere")
    for args in (("--out", tmp_path / "runs" / "c" / "q.png"), ("--out-dir", tmp_path / "runs" / "c" / "d")):
        msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, *args, "--device", "cpu"))
        assert "is a symbolic link to ../nowhere, which does not exist" in msg


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_round_twenty_four_a_signal_during_any_commands_write_removes_its_temporary_file(tmp_path, image_file, signum):
    """blur-preview and schedule-plot did not turn SIGTERM or SIGHUP into a stop (only train, sample and fid did): a
    kill as the PNG was written left its temporary file (tens of MB for a large strip) and printed nothing."""
    import subprocess
    import sys

    script = tmp_path / "kill.py"
    script.write_text(
        "import os, sys\n"
        "real = os.fsync\n"
        "def fsync(fd):  # the signal arrives as the output is flushed to disk\n"
        f"    os.kill(os.getpid(), {int(signum)})\n"
        "    return real(fd)\n"
        "os.fsync = fsync\n"
        "from bdm_cli.cli import run\n"
        "sys.argv = ['bdm', *sys.argv[1:]]\n"
        "run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = tmp_path / "out"
    out.mkdir()
    for args in (["blur-preview", str(image_file), "--size", "16", "--out", str(out / "strip.png")],
                 ["schedule-plot", "--preset", "tiny", "--out", str(out / "plot.png")]):
        p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 128 + signum and "Interrupted." in p.stdout + p.stderr, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr and list(out.iterdir()) == [], (args, list(out.iterdir()))


def test_round_twenty_four_a_failed_run_in_a_users_empty_folder_leaves_it_empty(tmp_path):
    """A new run in an existing empty --out that failed before its first checkpoint left config.yaml, metrics.jsonl,
    samples/ and .lock there, and the same command was then refused ("holds a run stopped before its first
    checkpoint"); a folder that the command made was removed. The user's folder is now emptied and kept."""
    bad = _images(tmp_path / "bad", n=10, size=16)
    for i in range(30):
        (bad / f"b{i}.png").write_bytes((bad / "0.png").read_bytes()[:60])  # damaged: more than half unreadable
    run = tmp_path / "mine"
    run.mkdir()
    msg = one_line_error(invoke("train", "--preset", "tiny", "--steps", 30, "--data", bad, "--out", run), 1)
    assert "no checkpoint was written yet" in msg
    assert run.is_dir() and list(run.iterdir()) == []
    r = invoke("train", "--preset", "tiny", "--steps", 2, "--out", run)
    assert r.exit_code == 0, r.output


def test_round_twenty_four_library_helpers_refuse_what_they_would_turn_into_garbage(tmp_path):
    """spectrum.image_statistics and fid.as_inception_input took NaN images (NaN statistics, black images for the
    Inception), polynomial_mmd NaN features, save_stats wrote statistics that read_stats refuses, and the preview
    helpers failed inside Python or torch (n = 0, no rows, a noise of another shape) or drew what they were not
    given (a label short, tile 0, NaN tiles)."""
    from bdm_cli import fid, spectrum
    from bdm_cli.engine import BlurSchedule
    from bdm_cli.preview import blur_strip, save_strip, schedule_table

    nan = torch.full((4, 3, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="finite"):
        spectrum.image_statistics(nan)
    with pytest.raises(ValueError, match="finite"):
        spectrum.compare(nan, torch.rand(4, 3, 8, 8) * 2 - 1)
    with pytest.raises(ValueError, match="not finite"):
        fid.as_inception_input(nan)
    with pytest.raises(ValueError, match="not finite"):
        fid.polynomial_mmd(np.full((3, 4), np.nan), np.ones((3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        fid.polynomial_mmd(np.ones(3), np.ones(3))
    for mu, sigma, n, what in ((np.zeros(4), np.eye(4), 0, "n must be"), (np.full(4, np.nan), np.eye(4), 5, "mu must be")):
        with pytest.raises(fid.UserError, match=what):
            fid.save_stats(tmp_path / "s.npz", mu, sigma, n)
    assert not list(tmp_path.iterdir())
    feats = np.random.default_rng(0).random((6, 4))
    written = fid.save_stats(tmp_path / "ok.npz", feats.mean(0), np.cov(feats, rowvar=False), 6, feats)
    assert fid.read_stats(written, 4)[2] == 6
    s, x = BlurSchedule(sigma_blur_max=2), torch.rand(3, 8, 8) * 2 - 1
    for call, what in ((lambda: schedule_table(s, 8, 8, n=0), "n must be"), (lambda: schedule_table(s, 0, 8), "height"),
                       (lambda: save_strip([], [], tmp_path / "e.png"), "one or more tensors"),
                       (lambda: save_strip([torch.rand(2, 3, 8, 8)], ["a"], tmp_path / "e.png"), "each of the 2 columns"),
                       (lambda: save_strip([torch.rand(2, 3, 8, 8)], ["a", "b"], tmp_path / "e.png", tile=0), "tile"),
                       (lambda: save_strip([nan[:2]], ["a", "b"], tmp_path / "e.png"), "finite"),
                       (lambda: blur_strip(x, s, [0.5], torch.randn(3, 4, 4)), "noise must be"),
                       (lambda: blur_strip(x, s, [1.5], torch.randn(3, 8, 8)), r"ts must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=what):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npz"]


def test_round_twenty_four_options_that_change_nothing_and_folders_fid_would_mix(good_run, tmp_path, image_file):
    """blur-preview and schedule-plot took --set of sections they never read (train.seed, sample.steps) and --seed
    with --no-noise, without effect; sample --out-dir counted only NNNNNN.png as earlier samples (000099.PNG, a.jpg
    or a subfolder joined the set bdm fid scores); a few messages said the wrong thing ("1 images", a --out equal to
    --out-dir "inside" it, a run's metrics.jsonl folder as "a file name to write to", t = 1e-320 as 9.99989e-321)."""
    for args in (("blur-preview", image_file, "--set", "train.seed=3"), ("blur-preview", image_file, "--set", "sample.steps=3"),
                 ("blur-preview", image_file, "--no-noise", "--seed", 5), ("schedule-plot", "--set", "data.channels=1")):
        msg = one_line_error(invoke(*args, "--out", tmp_path / "p.png"), 2)
        assert "would change nothing" in msg or "give one of them" in msg, msg
    for args in (("blur-preview", image_file, "--set", "data.channels=1", "--set", "diffusion.sigma_blur_max=3"),
                 ("blur-preview", image_file, "--no-noise"), ("schedule-plot", "--set", "data.resolution=16")):
        assert invoke(*args, "--out", tmp_path / "p.png").exit_code == 0
    r = invoke("blur-preview", image_file, "--t", "1e-320,0.9999999999999999", "--out", tmp_path / "p.png")
    assert "t = 1e-320, 0.9999999999999999" in r.output, r.output
    for other in ("000099.PNG", "a.jpg", "sub"):
        od = tmp_path / f"od_{other}"
        od.mkdir()
        (od / other).mkdir() if other == "sub" else (od / other).write_bytes(image_file.read_bytes())
        msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--steps", 1, "--out-dir", od), 2)
        assert "bdm fid would score with the samples" in msg
        assert sorted(p.name for p in od.iterdir()) == [other]
    od = tmp_path / "notes"
    od.mkdir()
    (od / "notes.txt").write_text("mine")
    r = invoke("sample", "--run", good_run, "--n", 1, "--steps", 1, "--out-dir", od, "--out", tmp_path / "g.png")
    assert r.exit_code == 0 and "Sampling 1 image from" in r.output and ", 1 step," in r.output, r.output
    msg = one_line_error(invoke("sample", "--run", good_run, "--n", 2, "--out", tmp_path / "same", "--out-dir", tmp_path / "same"), 2)
    assert "is --out-dir itself" in msg
    run = _copy_run(good_run, tmp_path / "resumed")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    assert "metrics.jsonl is a folder (bdm train writes" in one_line_error(invoke("train", "--resume", run, "--steps", 3), 2)


def test_round_twenty_five(good_run, tmp_path, monkeypatch, capsys):
    """An optimizer state missing a moment gave torch's KeyError on --resume, and an empty or partial one restarted
    Adam silently; NaN training weights beside good EMA weights were said to sample nothing; a checkpoint given to fid
    was "no images"; the library's train() replaced a checkpoint and wrote among a user's files; an agreed stop
    (unreadable data, a non-finite loss) printed its Error line once per rank."""
    import typer

    from bdm_cli.cli import user_errors
    from bdm_cli.config import load_config
    from bdm_cli.errors import AgreedError
    from bdm_cli.train import train

    def edited(name, change):
        run = _copy_run(good_run, tmp_path / name)
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        change(state)
        torch.save(state, run / "checkpoint.pt")
        return run

    for name, change, what in (
            ("no_moment", lambda s: s["opt"].update(state={i: {"step": v["step"]} for i, v in s["opt"]["state"].items()}),
             "optimizer state is damaged"),
            ("no_sq", lambda s: [v.pop("exp_avg_sq") for v in s["opt"]["state"].values()], "optimizer state is damaged"),
            ("empty", lambda s: s["opt"].update(state={}), "moments for 0 of the"),
            ("partial", lambda s: s["opt"].update(state={0: s["opt"]["state"][0]}), "moments for 1 of the"),
            ("nan_model", lambda s: next(iter(s["model"].values())).fill_(float("nan")), "training weights ('model')")):
        msg = one_line_error(invoke("train", "--resume", edited(name, change), "--steps", 3))
        assert what in msg, msg
    assert "cannot resume from them (sampling uses the EMA weights" in msg
    assert invoke("sample", "--run", tmp_path / "nan_model", "--n", 2, "--steps", 1, "--out", tmp_path / "g.png").exit_code == 0
    msg = one_line_error(invoke("fid", good_run / "checkpoint.pt", "digits", "--dims", 64), 2)
    assert "is a torch checkpoint, not images" in msg
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "checkpoint.pt").write_text("x")
    for folder, what in ((mine, "already holds a run"), (good_run.parent, "not a bdm run's")):
        before = _snapshot(folder)
        with pytest.raises(Exception, match=what):
            train(load_config("tiny", ["train.steps=1"]), folder)
        assert _snapshot(folder) == before
    with pytest.raises(TypeError, match="run_dir must be a path"):
        train(load_config("tiny"), None)
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(typer.Exit) as e:
            with user_errors():
                raise AgreedError("the loss is not finite at step 3")
        assert e.value.exit_code == 1 and ("the loss is not finite" in capsys.readouterr().err) == shown


def test_round_twenty_six(good_run, monkeypatch):
    """load_run(ema="no") loaded the EMA weights and sample_batches(clamp="False") clamped: flags take True or False
    only; bdm sample under torchrun did all the work on every rank into the same files, and one rank then failed."""
    from bdm_cli.generate import load_run, sample_batches

    with pytest.raises(TypeError, match="ema must be True or False"):
        load_run(good_run / "checkpoint.pt", ema="no", device="cpu")
    r = load_run(good_run / "checkpoint.pt", device="cpu")
    for flag in ("clamp", "bf16", "compile"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False"):
            next(sample_batches(r, 1, steps=1, **{flag: "False"}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for args in (("sample", "--run", good_run, "--n", 2), ("fid", "digits", "digits")):
        assert "runs in one process (WORLD_SIZE=2)" in one_line_error(invoke(*args), 2)


def test_round_twenty_seven(good_run, tmp_path):
    """A model whose output overflows (finite weights, near float32's largest) gave finite, plausible-looking garbage:
    the per-frequency clamp made its infinite x prediction the data's bounds, and bdm sample wrote the images."""
    from bdm_cli.engine import BlurSchedule, NonFiniteOutput, sample

    noise = torch.randn(3, 1, 8, 8)
    bounds = (-5 * torch.ones(1, 8, 8), 5 * torch.ones(1, 8, 8))

    def overflows(z, t):
        return torch.where(torch.arange(3).view(3, 1, 1, 1) == 1, torch.inf, torch.zeros_like(z))

    with pytest.raises(NonFiniteOutput, match="for 1 of the 3 samples .* is NaN or inf"):
        sample(overflows, noise, BlurSchedule(sigma_blur_max=2.0), 3, sampler="ddim", denoised_range=bounds)
    run = _copy_run(good_run, tmp_path / "run")
    state = load_checkpoint(run / "checkpoint.pt")
    for weights in (state["model"], state["ema"]):
        out = [k for k in weights if k.endswith("weight")][-1]  # the network's last layer
        weights[out] = weights[out] * 3e38 / weights[out].abs().max()  # finite, its sums are not
    torch.save(state, run / "checkpoint.pt")
    r = invoke("sample", "--run", run, "--n", 2, "--steps", 2, "--out", tmp_path / "s.png")
    assert "samples are not finite" in one_line_error(r, 1) and not (tmp_path / "s.png").exists()


def _bdm_limited(tmp_path, limit, value, *args):
    """``python -m bdm_cli ARGS`` under one resource limit (``ulimit``), its output through pipes (which no file-size
    limit reaches)."""
    import resource
    import subprocess
    import sys

    from .conftest import ROOT

    return subprocess.run([sys.executable, "-m", "bdm_cli", *map(str, args)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(limit, (value, value)))


def test_round_twenty_seven_environment(good_run, tmp_path):
    """A low address-space limit (ulimit -v) gave torch's ImportError traceback from every command; a file-size limit
    (ulimit -f) on a new run's first checkpoint said "is the disk full?" and "the previous checkpoint is kept" (there
    was none), and on a sample "File too large" without the file; macOS's AppleDouble twins (._a.png) were read as
    images, and half a dataset copied from a Mac failed to decode; train left its run's lock file to the garbage
    collector (a ResourceWarning under python -X dev)."""
    import resource
    import subprocess
    import sys

    from bdm_cli.data import make_dataset

    from .conftest import ROOT

    r = _bdm_limited(tmp_path, resource.RLIMIT_AS, 1 << 30, "presets")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("Error: could not load the libraries bdm needs") and "ulimit -v" in r.stderr, r.stderr
    r = _bdm_limited(tmp_path, resource.RLIMIT_FSIZE, 50 << 10, "train", "--preset", "tiny", "--steps", 2, "--out", "run")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "file-size limit of 51200 bytes (ulimit -f)); no checkpoint was written" in r.stderr and not (tmp_path / "run").exists()
    r = _bdm_limited(tmp_path, resource.RLIMIT_FSIZE, 0, "sample", "--run", good_run, "--n", 2, "--steps", 2, "--out", "s.png")
    assert r.returncode == 1 and "Error: File too large: s.png (over this process's file-size limit" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file either

    photos = _images(tmp_path / "photos", n=3)
    for p in list(photos.iterdir()):
        (photos / f"._{p.name}").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64))
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        for p in photos.iterdir():
            z.write(p, f"set/{p.name}")
    for source in (photos, tmp_path / "photos.zip"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "skipping unreadable image"
            assert len(make_dataset(str(source), 8, 3, "")) == 3

    r = subprocess.run([sys.executable, "-X", "dev", "-m", "bdm_cli", "train", "--preset", "tiny", "--steps", "2", "--out",
                        str(tmp_path / "dev")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0 and "unclosed file" not in r.stderr, r.stderr[-2000:]


def _pickle_edited(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    """A copy of a checkpoint with one byte pattern of its pickle (data.pkl) replaced: what no torch.save writes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new, 1)
            zout.writestr(info.filename, data)
    return dst


def test_round_twenty_eight(good_run, tmp_path):
    """A checkpoint whose config held a mapping 10^5 deep where a list belongs (RecursionError in the message's
    repr), or whose storage declared a negative size (torch's TypeError): tracebacks. A progressive JPEG of 5,000
    scans decoded for a minute (each scan decodes the whole picture again). A model's finite but huge output made
    an x prediction that overflowed to NaN or inf, or that the clamp turned into plausible-looking garbage. A --set
    item of a megabyte was printed whole."""
    import struct

    from bdm_cli.engine import BlurSchedule, NonFiniteOutput, sample

    state = load_checkpoint(good_run / "checkpoint.pt")
    state["config"]["model"]["channel_mult"] = "PLACEHOLDERXYZ"
    state["extra"] = torch.zeros(77777)
    torch.save(state, tmp_path / "src.pt")
    depth = 100_000  # {"k": {"k": ...}} as pickle opcodes: EMPTY_DICT, then (BINUNICODE "k", EMPTY_DICT) x n, SETITEM x n
    deep = b"}" + (b"X\x01\x00\x00\x00k}" * (depth - 1)) + b"s" * (depth - 1)
    placeholder = b"X" + struct.pack("<I", 14) + b"PLACEHOLDERXYZ"
    for name, old, new in (("deep.pt", placeholder, deep), ("negative.pt", b"J" + struct.pack("<i", 77777), b"\x8a\x01\xfb")):
        bad = _pickle_edited(tmp_path / "src.pt", tmp_path / name, old, new)
        msg = one_line_error(invoke("sample", "--checkpoint", bad, "--n", 1, "--steps", 1, "--out", tmp_path / "s.png"), 1)
        assert name in msg and len(msg) < 600, msg

    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", (256, 256), (128, 100, 90)).save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    scan = data[data.rindex(b"\xff\xda"):-2]
    (tmp_path / "scans.jpg").write_bytes(data[:-2] + scan * 600 + b"\xff\xd9")
    (tmp_path / "fine.jpg").write_bytes(data)  # the same picture as an encoder writes it (10 scans): read
    msg = one_line_error(invoke("blur-preview", tmp_path / "scans.jpg", "--out", tmp_path / "b.png"), 1)
    assert "progressive JPEG of 6" in msg and "scans, more than the 500" in msg
    assert invoke("blur-preview", tmp_path / "fine.jpg", "--out", tmp_path / "b.png").exit_code == 0

    noise = torch.randn(3, 1, 8, 8)
    bounds = (-5 * torch.ones(1, 8, 8), 5 * torch.ones(1, 8, 8))
    for big in (3e38, 1e37):
        def huge(z, t, big=big):
            return torch.where(torch.arange(3).view(3, 1, 1, 1) == 1, big, torch.zeros_like(z))

        for sampler, rng in (("ddim", None), ("ancestral", bounds), ("unipc", bounds)):
            with pytest.raises(NonFiniteOutput, match="for 1 of the 3 samples"):
                sample(huge, noise, BlurSchedule(sigma_blur_max=2.0), 4, sampler=sampler, denoised_range=rng)

    msg = one_line_error(invoke("train", "--preset", "tiny", "--out", tmp_path / "run", "--set", "x" * 1_000_000), 2)
    assert "--set expects section.key=value" in msg and len(msg) < 300


def test_round_twenty_nine(tmp_path):
    """The library's train() took a Config made with dataclasses.replace unchecked (batch_size 0: ZeroDivisionError
    and a half-made run folder; steps -3 or ema_decay 1.5: a checkpoint that bdm itself then called damaged);
    frechet_distance of finite statistics whose sums overflow was a perfect 0.0, and kernel_distance NaN."""
    import dataclasses

    from bdm_cli import fid
    from bdm_cli.config import ConfigError, load_config
    from bdm_cli.errors import UserError
    from bdm_cli.train import train

    cfg = load_config("tiny")
    for section, change, match in (("train", {"batch_size": 0}, "batch_size must be > 0"),
                                   ("train", {"steps": -3}, "steps must be >= 0"),
                                   ("train", {"ema_decay": 1.5}, "ema_decay must be in"),
                                   ("data", {"resolution": 3}, "resolution must be >= 4"),
                                   ("model", {"num_heads": 0}, "num_heads"),
                                   ("train", {"weight_decay": float("inf")}, "weight_decay must be a finite number")):
        bad = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **change)})
        with pytest.raises(ConfigError, match=match):
            train(bad, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    with pytest.raises(TypeError, match="cfg must be a bdm_cli.config.Config"):
        train(None, tmp_path / "run")

    with pytest.raises(UserError, match="too large to compute"):
        fid.frechet_distance([0, 0], np.diag([1e308, 1e308]), [5, 5], np.diag([1e300, 1e300]))
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="too large to compute"):
        fid.kernel_distance(rng.random((50, 8)) * 1e200, rng.random((50, 8)), subsets=3, subset_size=10)
    with pytest.raises(UserError, match="no dimensions"):
        fid.kernel_distance(np.zeros((5, 0)), np.zeros((5, 0)), subsets=3, subset_size=3)
    for seed in (-1, "x"):
        with pytest.raises(UserError, match="seed must be"):
            fid.kernel_distance(rng.random((5, 8)), rng.random((5, 8)), subsets=3, subset_size=3, seed=seed)
    with pytest.raises(UserError, match="written to a .npz file"):
        fid.save_stats(tmp_path / "s4", np.zeros(2), np.eye(2), 10)
    assert not (tmp_path / "s4").exists()


def test_round_thirty(good_run, tmp_path):
    """A progressive JPEG whose ICC profile or comment holds FF DA bytes was refused as a "scan bomb" (metadata is not
    byte-stuffed: the scan count must walk the segments); a file-size limit met by metrics.jsonl named no file; the
    library's data helpers gave 3 channels for channels=2, 4 or 0 and failed inside Pillow for a size of 0; a
    Config field of a Python type was blamed on YAML; a resume read the whole metrics.jsonl into memory (a foreign
    line of 100 KB is now kept unread)."""
    import dataclasses
    import resource

    from bdm_cli import data
    from bdm_cli.config import ConfigError, from_dict, load_config, to_dict
    from bdm_cli.errors import UserError

    rng = np.random.default_rng(0)
    picture = Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))
    for extra in ({"icc_profile": b"\xff\xda" * 600}, {"comment": b"\xff\xda" * 600}):
        picture.save(tmp_path / "meta.jpg", progressive=True, **extra)
        assert data.load_image(tmp_path / "meta.jpg", 8).shape == (3, 8, 8)

    run = _copy_run(good_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("a note of mine " + "x" * 100_000 + "\n")
    r = _bdm_limited(tmp_path, resource.RLIMIT_FSIZE, 50_000, "train", "--resume", run, "--steps", 4, "--set", "train.log_every=1")
    assert "Error: File too large: " in r.stderr and "metrics.jsonl (over this process's file-size limit" in r.stderr, r.stderr
    assert "a note of mine" in (run / "metrics.jsonl").read_text()

    for call, match in ((lambda: data.make_dataset("digits", 8, 2), "channels must be 1"),
                        (lambda: data.make_dataset("digits", 8, 3.0), "channels must be 1"),
                        (lambda: data.load_image(tmp_path / "meta.jpg", 0), "resolution must be a whole number"),
                        (lambda: data.load_image(tmp_path / "meta.jpg", 10**6), "resolution must be a whole number"),
                        (lambda: data.preprocess(Image.new("RGB", (0, 0)), 8), "the image is empty")):
        with pytest.raises((ValueError, UserError), match=match):
            call()
    assert data.preprocess(Image.new("LA", (8, 8)).convert("La"), 8).shape == (3, 8, 8)

    cfg = load_config("tiny")
    with pytest.raises(ConfigError, match="train.device must be text \\(a str\\), got a device"):
        from_dict(to_dict(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=torch.device("cpu")))))
    assert from_dict(to_dict(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=tmp_path)))).data.dataset == str(tmp_path)


def test_round_thirty_one(good_run, tmp_path, monkeypatch):
    """A resume dropped every record of a metrics.jsonl whose lines end in CR only (one "line" taken for a record cut
    short) and kept a crash's tail of NULs as a line; posterior_coefficients gave NaN or negative coefficients for
    alpha 0 or delta -1; `extends: ./tiny` loaded the built-in tiny, `extends: ~` nothing; each preset of a chain was
    checked alone (a base valid only with its child's values was refused), and errors named a parent by its base name."""
    from bdm_cli.config import ConfigError, load_config
    from bdm_cli.engine import posterior_coefficients

    for name, edit in (("cr", lambda b: b.replace(b"\n", b"\r")), ("nul", lambda b: b + b"\x00" * 4096)):
        run = _copy_run(good_run, tmp_path / name)
        records = (run / "metrics.jsonl").read_bytes().count(b'{"step": ')
        (run / "metrics.jsonl").write_bytes(edit((run / "metrics.jsonl").read_bytes()))
        assert invoke("train", "--resume", run, "--steps", 4).exit_code == 0
        after = (run / "metrics.jsonl").read_bytes()
        assert after.count(b'{"step": ') > records and b"\x00" not in after

    for args, kwargs, match in (((0.0, 1.0, 0.0, 1.0), {}, "alphas > 0"), ((0.5, 0.8, 0.6, 0.7), {"delta": -1}, "delta"),
                                ((0.5, 0.8, 0.6, 0.7), {"delta": float("nan")}, "delta"),
                                ((torch.ones(3) * 0.1, torch.ones(4), torch.ones(5), torch.ones(5)), {}, "broadcast"),
                                (("0.5", 0.8, 0.6, 0.7), {}, "alpha_t must be a real number")):
        with pytest.raises((ValueError, TypeError), match=match):
            posterior_coefficients(*args, **kwargs)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("")  # a file named like the built-in preset
    (tmp_path / "dot.yaml").write_text("extends: ./tiny\n")
    (tmp_path / "null.yaml").write_text("extends:\ndiffusion:\n  sigma_blur_max: 3\n")
    with pytest.raises(ConfigError, match="must end in .yaml"):
        load_config("dot.yaml")
    with pytest.raises(ConfigError, match="'extends' must name a preset or a .yaml file, got None"):
        load_config("null.yaml")
    (tmp_path / "pa").mkdir()
    (tmp_path / "pb").mkdir()
    (tmp_path / "pb" / "base.yaml").write_text("extends: tiny\ntrain:\n  lr: -1\n")  # valid only with its child's lr
    (tmp_path / "pa" / "child.yaml").write_text("extends: ../pb/base.yaml\ntrain:\n  lr: 0.001\n")
    assert load_config("pa/child.yaml").train.lr == 0.001
    (tmp_path / "pb" / "base.yaml").write_text("extends: tiny\ntrain:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"pa{os.sep}..{os.sep}pb{os.sep}base.yaml: unknown key train.lrr")):
        load_config("pa/child.yaml")


def test_round_thirty_two(tmp_path):
    """posterior_coefficients gave NaN for float16 tensors (delta 1e-8 is 0 there) and for finite float32 ones whose
    squares overflow, and took numpy's bools and complex numbers; a symlinked preset looked for its parent beside the
    link; a resume kept records past the checkpoint in a tail of lone-CR lines; denoise_mean_var returned a float64
    mean for a float32 z_t."""
    from bdm_cli.config import load_config
    from bdm_cli.engine import BlurSchedule, denoise_mean_var, posterior_coefficients
    from bdm_cli.train import _trim_metrics

    half = [torch.tensor(v, dtype=torch.float16) for v in (0.9, 0.5, 0.95, 0.0)]
    for args in (half, [torch.tensor(v) for v in (1e30, 1e30, 1e30, 1e29)]):
        out = posterior_coefficients(*args)
        assert all(torch.isfinite(c).all() and c.dtype == args[0].dtype for c in out)
    for bad in (np.bool_(True), np.array([0.9 + 1j]), np.array(["a"])):
        with pytest.raises(TypeError, match="alpha_t must be a real number"):
            posterior_coefficients(bad, 0.5, 0.95, 0.3)
    mean, var = denoise_mean_var(torch.randn(2, 1, 8, 8), 0.5, 0.4, torch.randn(2, 1, 8, 8, dtype=torch.float64),
                                 BlurSchedule(sigma_blur_max=2.0))
    assert mean.dtype == var.dtype == torch.float32

    (tmp_path / "p" / "sub").mkdir(parents=True)
    (tmp_path / "q").mkdir()
    (tmp_path / "p" / "base.yaml").write_text("extends: tiny\ntrain:\n  steps: 7\n")
    (tmp_path / "p" / "sub" / "real.yaml").write_text("extends: ../base.yaml\n")
    (tmp_path / "q" / "link.yaml").symlink_to(tmp_path / "p" / "sub" / "real.yaml")
    (tmp_path / "base.yaml").write_text("train:\n  steps: 99\n")  # beside the link's folder: not the preset's parent
    assert load_config(str(tmp_path / "q" / "link.yaml")).train.steps == 7

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 10, "loss": 1}\n{"step": 20, "loss": 1}\r{"step": 25, "loss": 1}\r{"step":')
    _trim_metrics(metrics, 20)
    assert metrics.read_bytes() == b'{"step": 10, "loss": 1}\n{"step": 20, "loss": 1}\r'


def test_round_thirty_three(good_run, tmp_path):
    """--resume of a file that is no checkpoint (a PNG, a run's grid) said "takes the run's folder (.), not its
    checkpoint file", pointing at a folder that is no run."""
    (tmp_path / "notimg.png").write_text("hi")
    msg = one_line_error(invoke("train", "--resume", tmp_path / "notimg.png"), 2)
    assert "takes a run's folder (the one that holds checkpoint.pt), not the file" in msg and "(.)" not in msg
    msg = one_line_error(invoke("train", "--resume", good_run / "config.yaml"), 2)
    assert f"takes the run's folder ({good_run}), not one of its files" in msg

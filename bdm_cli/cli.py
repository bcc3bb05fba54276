"""The ``bdm`` command line: one short function per command that validates input and calls the library."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import INTERRUPTED, AgreedError, UsageError, UserError, raise_if_interrupted
from .paths import blocking_file, first_missing, not_a_folder, output_file, remove_empty_folders, user_path

app = typer.Typer(
    name="bdm",
    help="Blurring Diffusion Models (Hoogeboom & Salimans, ICLR 2023): train, sample, inspect and score.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
def _console(**kw) -> Console:
    """A rich console whose lines never wrap (a result or error line stays one line for scripts and pipes), and that
    takes a COLUMNS too narrow to print in (0, 4) as 80: rich printed nothing at 0 and split numbers at 4."""
    try:
        narrow = int(os.environ.get("COLUMNS") or 80) < 20
    except ValueError:
        narrow = True
    return Console(soft_wrap=True, width=80 if narrow else None, **kw)


console = _console(stderr=True)
out = _console()
TRAJECTORY_SAMPLES = 8  # rows of bdm sample --trajectory
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; larger ones would alias smaller ones
MAX_COMPARE = 16  # schedule-plot --compare: each value is a line in every panel
MAX_BATCH = 100_000  # samples or images per batch (bdm fid's bound too)
MAX_KID_SUBSETS = 10_000
MAX_SAMPLES = 10_000_000  # bdm sample --n / fid --n: days of sampling at that (names widen past 999999.png)

def _user_path(text: str) -> Path:
    """The parser of path options: :func:`~bdm_cli.paths.user_path`; an empty one (an unset shell variable) is
    refused, where ``Path("")`` would silently be the current folder."""
    if not text.strip():
        raise typer.BadParameter("is empty (an unset shell variable?); give a path")
    return user_path(text)


def _output_file(text: str) -> Path:
    """The parser of file outputs: :func:`~bdm_cli.paths.output_file`, its refusal as the option's own error."""
    try:
        return output_file(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Preset name (see `bdm presets`) or a .yaml file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: section.key=value.")]


@contextlib.contextmanager
def user_errors():
    """Turn user errors into one line on stderr and a non-zero exit; real bugs keep their traceback. SIGTERM and
    SIGHUP stop a command as Ctrl-C does (:func:`_stopped_by_signals`): "Interrupted.", 128 + the signal, and the
    file being written is removed (blur-preview and schedule-plot left their temporary files to them)."""
    try:
        with _stopped_by_signals():
            yield
    except UserError as e:
        if not (isinstance(e, AgreedError) and _rank() > 0):
            _error(str(e))
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # the environment, not a bug: disk full, permissions, a vanished file
        limit = " (over this process's file-size limit: ulimit -f)" if e.errno == errno.EFBIG else ""
        _error(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "") + limit)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as e:
        if isinstance(e.__context__, UserError):  # a stop that came as an error was on its way out (torchrun's SIGTERM
            _error(str(e.__context__))  # to the ranks left when one failed): the error is what happened
            raise typer.Exit(e.__context__.exit_code) from None
        console.print("[yellow]Interrupted.[/]")
        raise typer.Exit(128 + getattr(e, "signum", signal.SIGINT)) from None
    except Exception as e:  # the machine's limits and toolchain, not a bug: one line that says what to do
        text = _first_line(e)
        if INTERRUPTED.is_set():  # an error that a Ctrl-C caused (a half-imported module imported again): the stop
            console.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OUT_OF_MEMORY.search(str(e))):
            _error(f"out of memory ({text}): lower --batch-size (or --n, --size, or the model's size: model.channels, model.num_res_blocks), or use a machine with more memory")
        elif type(e).__name__ in ("InductorError", "BackendCompilerFailed", "InvalidCxxCompiler"):  # torch.compile's
            _error(f"torch.compile failed ({type(e).__name__}: {text}): run without --compile (train.compile=false), "
                   "or install a working C++ compiler")
        else:
            raise
        raise typer.Exit(1) from None


# CPU allocator and CUDA messages (torch.OutOfMemoryError is a RuntimeError)
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory|DefaultCPUAllocator", re.IGNORECASE)


def _first_line(e: BaseException) -> str:
    """An exception's message for one line: its first line, at most 200 characters, or its type's name."""
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def _error(message: str) -> None:
    """The one ``Error:`` line."""
    _say("[bold red]Error:[/]", message)


def _plain(text) -> str:
    """Text from the user (a path, a name) for a rich line: control characters (a newline or a terminal escape in a
    file name, say) shown escaped, the bytes of a name that is not UTF-8 as ``\\xff`` (not Python's ``\\udcff``), and
    square brackets not read as markup."""
    from rich.markup import escape

    text = re.sub(r"[\udc80-\udcff]", lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", str(text))
    return escape(re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: repr(m.group())[1:-1], text))


def _say(label: str, message: str) -> None:
    """One line on stderr, the message :func:`_plain`."""
    console.print(f"{label} {_plain(message)}", highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"bdm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Blurring Diffusion Models: train, sample, inspect and score."""


@app.command("presets")
def presets_cmd(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show resolution and blur.")] = False):
    """List the presets, one line each."""
    from .config import list_presets, load_config

    with user_errors():
        for name, description in list_presets().items():
            extra = ""
            if verbose:
                from .unet import build_model, count_parameters

                cfg = load_config(name)
                params = count_parameters(build_model(cfg))
                extra = (f"\n{'':17s}[dim]{params / 1e6:.2f}M parameters, {cfg.data.resolution}px, {cfg.data.channels}ch, "
                         f"sigma_blur_max={cfg.diffusion.sigma_blur_max:g}, {cfg.sample.steps} {cfg.sample.sampler} steps[/]")
            out.print(f"[bold]{name:16s}[/] {description}{extra}", highlight=False)


def _number(text: str) -> float | None:
    """A decimal number as typed (``0.5``, ``1e-3``), else None: Python's float() also reads ``0_5`` as five."""
    text = text.strip()
    return float(text) if re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text) else None  # ASCII digits


def _t_values(ts: list[str] | None) -> list[float]:
    if not ts:
        return [round(0.1 * i, 1) for i in range(11)]
    values = []
    for raw in ts:
        for part in str(raw).split(","):
            t = _number(part)
            if t is None:
                raise UsageError(f"--t must be a number in [0, 1], got {part!r}")
            if not 0.0 <= t <= 1.0:
                raise UsageError(f"--t must be in [0, 1], got {part.strip()}")  # as typed: 1.0000000001 is not "1"
            values.append(t + 0.0)  # -0 is 0
    return values  # a time twice is the same column twice, harmless (--compare refuses it: its lines would hide)


def _set_once(given: dict[str, str], sets: list[str] | None) -> None:
    """An option and a ``--set`` of the same config key (``{key: option}`` of the options given): refused, where one
    would silently win."""
    for s in sets or []:
        key = s.partition("=")[0].strip()
        if key in given:
            raise UsageError(f"{given[key]} and --set {key} both set it: give one")


def _diffusion_config(preset: str, sets: list[str] | None, sigma_blur_max: float | None, blur: str | None,
                      size: int | None, *, command: str, data_keys: tuple[str, ...]):
    """The preset's config with --set and the blur options, for a command that reads only its diffusion section and
    ``data_keys``: a --set of anything else (train.seed, sample.steps) would change nothing, and is refused."""
    from .config import ConfigError, apply_overrides, load_config

    cfg = load_config(preset, sets or [])  # first: a typo or a bad value is named as such
    for item in sets or []:
        key = item.partition("=")[0].strip()
        if not key.startswith("diffusion.") and key not in data_keys:
            raise UsageError(f"--set {key}: bdm {command} reads only the diffusion section and "
                             f"{', '.join(data_keys)} of a config, so it would change nothing here")
    options = (("--sigma-blur-max", "sigma_blur_max", sigma_blur_max), ("--blur", "blur", blur))
    _set_once({f"diffusion.{key}": flag for flag, key, value in options if value is not None}
              | ({"data.resolution": "--size"} if size is not None else {}), sets)
    for flag, key, value in options:
        if value is not None:
            try:
                cfg = apply_overrides(cfg, [f"diffusion.{key}={value}"]).validate()
            except ConfigError as e:  # its message names --set, which the user did not give
                raise UsageError(f"{flag}: {str(e).split(': ', 1)[-1]}") from None
    return cfg


def _one_process(command: str) -> None:
    """Sampling and scoring run in one process: under torchrun every rank did all the work into the same files, and
    the rank that found the other's file there failed."""
    if (world := _torchrun_number("WORLD_SIZE")) > 1:
        raise UsageError(f"bdm {command} runs in one process (WORLD_SIZE={world}): launch it without torchrun; "
                         "bdm train is the command that uses several")


def _torchrun_number(name: str) -> int:
    """A torchrun variable (RANK, WORLD_SIZE) as a number: 0 where it is unset or no whole number ("00" is 0 too;
    init_distributed refuses a bad value). train.whole's rule, without importing torch."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isascii() and value.isdigit() else 0


def _rank() -> int:
    return _torchrun_number("RANK")


def _shortest(v: float) -> str:
    """A time as typed: 6 significant digits where they hold it (0.1, 1e-05), else every digit it needs
    (0.9999999999999999 is not 1, and 1e-320 is not 9.99989e-321)."""
    short, exact = f"{v:g}", repr(v)
    return short if float(short) == v and len(short) <= len(exact) else exact


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


@app.command("blur-preview")
def blur_preview_cmd(
    image: Annotated[Path, typer.Argument(help="An image file (any format Pillow reads).", parser=_user_path)],
    t: Annotated[Optional[list[str]], typer.Option("--t", help="Times in [0, 1]; repeat or comma-separate. Default 0, 0.1, ..., 1.")] = None,
    preset: PresetOpt = "cifar10",
    sigma_blur_max: Annotated[Optional[float], typer.Option(help="Override the preset's blur strength.")] = None,
    blur: Annotated[Optional[str], typer.Option(help="Blur schedule: sin2 | linear.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Resolution (center crop + resize); default from the preset.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the noise (default 0).", min=0, max=MAX_SEED)] = None,
    no_noise: Annotated[bool, typer.Option("--no-noise", help="Only the pure-blur row.")] = False,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output PNG.", parser=_output_file)] = Path("blur_preview.png"),
    sets: SetOpt = None,
):
    """Show the forward process on a real image: z_t at each t, and the pure blur below it."""
    import torch

    from .data import load_image
    from .io import check_outputs
    from .preview import blur_strip, save_strip

    with user_errors():
        ts = _t_values(t)
        cfg = _diffusion_config(preset, sets, sigma_blur_max, blur, size, command="blur-preview",
                                data_keys=("data.resolution", "data.channels"))
        if no_noise and seed is not None:
            raise UsageError("--seed draws the noise, and --no-noise shows only the pure blur: give one of them")
        resolution = size if size is not None else cfg.data.resolution
        if not 2 <= resolution <= MAX_PREVIEW:
            raise UsageError(f"--size must be in 2..{MAX_PREVIEW}, got {resolution}")
        tile = max(resolution, 128)  # the strip draws its tiles at least 128 px (preview.save_strip)
        if len(ts) * tile**2 > MAX_STRIP_PIXELS:  # every tile of both rows is held at once
            raise UsageError(f"--t takes at most {max(1, MAX_STRIP_PIXELS // tile**2)} values at --size {resolution} "
                             f"(got {len(ts)}): the strip would need more memory than bdm allows it")
        check_outputs(out_path, images=True, inputs=[image])
        x = load_image(image, resolution, cfg.data.channels)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed or 0))
        rows = blur_strip(x, cfg.diffusion, ts, noise, with_noise=not no_noise)
        save_strip(rows, ["original"] + [f"t={_shortest(v)}" for v in ts], out_path)
        d = cfg.diffusion
        out.print(f"Wrote {_plain(out_path)} ({resolution}x{resolution}, sigma_blur_max={d.sigma_blur_max:g}, blur={d.blur}); "
                  f"t = {', '.join(map(_shortest, ts))}", highlight=False)


@app.command("schedule-plot")
def schedule_plot_cmd(
    preset: PresetOpt = "cifar10",
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (default schedule.png / .svg).", parser=_output_file)] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="png or svg (default: --out's extension, else png).")] = None,
    compare: Annotated[Optional[str], typer.Option(help="Comma-separated sigma_blur_max values to overlay, e.g. 0,10,20.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Image size whose frequencies are plotted; default from the preset.")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the numbers to this CSV file.", parser=_output_file)] = None,
    sigma_blur_max: Annotated[Optional[float], typer.Option(help="Override the preset's blur strength.")] = None,
    blur: Annotated[Optional[str], typer.Option(help="Blur schedule: sin2 | linear.")] = None,
    sets: SetOpt = None,
):
    """Plot a_t, sigma_t, sigma_blur(t), alpha_t per frequency and the per-frequency log-SNR."""
    from dataclasses import replace

    from .io import check_outputs
    from .preview import plot_schedule, write_schedule_csv

    with user_errors():
        suffix = out_path.suffix.lower().lstrip(".") if out_path else ""
        fmt = fmt or (suffix if suffix in ("png", "svg") else "png")
        if fmt not in ("png", "svg"):
            raise UsageError(f"--format must be png or svg, got {fmt!r}")
        if out_path is not None and suffix != fmt:
            raise UsageError(f"--out {out_path} does not end in .{fmt}: the plot is written as {fmt} (--format png or svg)")
        cfg = _diffusion_config(preset, sets, sigma_blur_max, blur, size, command="schedule-plot",
                                data_keys=("data.resolution",))
        schedule = cfg.diffusion
        schedules = [schedule]
        if compare and sigma_blur_max is not None:
            raise UsageError("--compare gives the sigma_blur_max values to plot; --sigma-blur-max would be ignored")
        if compare is not None and not compare.strip():
            raise UsageError("--compare is empty (an unset shell variable?): give sigma_blur_max values such as 0,2,20")
        if compare:
            values = [_number(v) for v in compare.split(",") if v.strip()]
            if None in values:
                raise UsageError(f"--compare must be comma-separated numbers, got {compare!r}")
            if not values or not all(0 <= v <= 1000 for v in values):
                raise UsageError(f"--compare needs sigma_blur_max values in [0, 1000], got {compare!r}")
            if len(values) > MAX_COMPARE:
                raise UsageError(f"--compare takes at most {MAX_COMPARE} values (one line each in every panel), "
                                 f"got {len(values)}")
            if len(set(values)) < len(values):
                raise UsageError(f"--compare gives a value twice (one line would hide the other): {compare!r}")
            schedules = [replace(schedule, sigma_blur_max=v) for v in values]
        resolution = size if size is not None else cfg.data.resolution
        if not 2 <= resolution <= MAX_PLOT:
            raise UsageError(f"--size must be in 2..{MAX_PLOT} (the plot holds a log-SNR per frequency and time), got {resolution}")
        path = out_path or Path(f"schedule.{fmt}")
        if csv_path and csv_path.suffix.lower() != ".csv":
            raise UsageError(f"--csv {csv_path} does not end in .csv")
        check_outputs(path, csv_path)
        os.environ["MPLBACKEND"] = "Agg"  # bdm writes files, never windows: a user's MPLBACKEND (even a wrong one) is moot
        plot_schedule(schedules, resolution, resolution, path, fmt)
        out.print(f"Wrote {_plain(path)}", highlight=False)
        if csv_path:
            write_schedule_csv(schedules, resolution, resolution, csv_path)
            out.print(f"Wrote {_plain(csv_path)}", highlight=False)


@app.command("train")
def train_cmd(
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (see `bdm presets`) or a .yaml file "
                                                  "(default digits).")] = None,
    data: Annotated[Optional[str], typer.Option(help="digits, cifar10, a folder or a zip of images (data.dataset).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<preset>).", parser=_user_path)] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its checkpoint.", parser=_user_path)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total training steps (train.steps).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (train.batch_size).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N (train.device).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, data order, t and noise (train.seed).")] = None,
    sets: SetOpt = None,
):
    """Train a model; `torchrun --nproc_per_node N -m bdm_cli train ...` for several GPUs (or CPU processes)."""
    import dataclasses
    import os

    from .checkpoint import CHECKPOINT, checkpoint_config, load_checkpoint
    from .config import apply_overrides, load_config
    from .data import dataset_source
    from .io import check_writable
    from .runtime import resolve_device
    from .train import RunLocked, train

    options = {"data.dataset": ("--data", data), "train.steps": ("--steps", steps),
               "train.batch_size": ("--batch-size", batch_size), "train.device": ("--device", device),
               "train.seed": ("--seed", seed)}
    overrides = list(sets or []) + [f"{key}={value}" for key, (_, value) in options.items() if value is not None]
    given = {key: opt for key, (opt, value) in options.items() if value is not None}
    with user_errors():
        _set_once(given, sets)  # before errors name options: it names both
    with user_errors(), _naming_options(given):
        if resume:
            if preset is not None or (out_dir is not None and out_dir.resolve() != resume.resolve()):
                raise UsageError("--resume continues a run with its own config in its own directory; --preset and --out "
                                 "do not apply (change a setting with --set section.key=value)")
            if resume.is_file():  # the run's folder suggested only where there is one (a PNG's "." was none)
                run_of = resume.parent if (resume.parent / CHECKPOINT).is_file() else None
                raise UsageError(f"--resume takes the run's folder ({run_of}), not one of its files" if run_of else
                                 f"--resume takes a run's folder (the one that holds {CHECKPOINT}), not the file {resume}")
            if not resume.is_dir():
                raise UsageError(f"--resume {resume}: " + ("no such run folder" if not resume.exists() else
                                                           "not a folder (a pipe or device)"))
            run_dir = resume
            state = load_checkpoint(run_dir)
            for name in (CHECKPOINT, "config.yaml", "metrics.jsonl"):  # before the run's files change
                if (run_dir / name).is_dir() and not (run_dir / name).is_symlink():  # the run's name, not the user's
                    raise UsageError(f"{run_dir / name} is a folder (bdm train writes its {name} there): move it away "
                                     "to continue the run")
                if (run_dir / name).exists():
                    check_writable(run_dir / name)
            for name in ("samples", "tb"):  # found here, not after the data is read and the start is announced
                if (run_dir / name).is_symlink() or ((run_dir / name).exists() and not (run_dir / name).is_dir()):
                    raise UsageError(f"{run_dir / name} is not a folder (bdm train writes its {name} there): move it "
                                     "away to continue the run")
            saved = checkpoint_config(state, run_dir / CHECKPOINT)
            asked = _check_config_file(run_dir, saved)
            target = saved
            if asked is not None and asked != saved.train.steps:  # an edit, or a --steps resume stopped before its
                target = apply_overrides(saved, [f"train.steps={asked}"])  # checkpoint: reached unless --steps differs
            cfg = apply_overrides(target, overrides).validate()
            _check_resume_overrides(saved, cfg)
            if isinstance(state.get("step"), int) and cfg.train.steps < state["step"]:
                raise UsageError(f"train.steps {cfg.train.steps} is below the run's step {state['step']}: give the total "
                                 "to reach, at least that")
            finished = cfg.train.steps == state.get("step")
        else:
            cfg, finished = load_config(preset or "digits", overrides), False
            if cfg.train.steps == 0:
                raise UsageError("train.steps is 0: a new run needs at least one step")
            run_dir = out_dir or Path("runs") / cfg.preset
            if preset and Path(preset).is_file() and Path(preset).resolve() == (run_dir / "config.yaml").resolve():
                raise UsageError(f"--preset {preset} is the config.yaml that the run in {run_dir} would write: keep the "
                                 "preset outside the run directory")
            from .train import check_new_run_dir

            check_new_run_dir(run_dir)
        try:  # before any folder is made; on --resume the device is the run's own unless --device changes it
            resolve_device(cfg.train.device, what="train.device")
        except UserError as e:
            raise (UserError(f"{e}; this run was trained there: resume it here with --device cpu (or auto)")
                   if resume and device is None else e) from None
        source = dataset_source(cfg.data.dataset, cfg.data.split)  # a resume with --data too; before any folder is made
        if finished:  # every option checked, nothing to do: no file of the finished run is rewritten
            out.print(f"{_plain(run_dir)} is already at step {cfg.train.steps}: nothing to train (a larger --steps continues it)",
                      highlight=False)
            return
        if source is not None and _nested(source, run_dir):
            raise UsageError(f"--out {run_dir} and the dataset {source} overlap: the run's sample grids would become "
                             "training data, or overwrite its images; choose an --out outside the dataset")
        if source is not None and not source.is_absolute():
            if resume and data is None:  # a run from before datasets were stored whole: read from where it resumes
                _say("[yellow]Warning:[/]", f"the run's dataset {cfg.data.dataset} is a relative path: reading "
                     f"{os.path.abspath(source)} (pass --data to choose another)")
            # stored whole: a resume from another folder reads the same data, never another folder of that name
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=os.path.abspath(source)))
        world = _torchrun_number("WORLD_SIZE")
        if world > 0 and cfg.train.batch_size % world:  # before the start is announced
            raise UsageError(f"train.batch_size {cfg.train.batch_size} must be divisible by the {world} processes")
        main = _rank() == 0  # a bad RANK is refused by init_distributed
        made = first_missing(run_dir) if main else None  # rank 0 writes the run's files, and removes what it made
        # a user's empty folder: what the run writes into it is removed as well when it fails before a checkpoint
        found_empty = main and resume is None and run_dir.is_dir() and not any(run_dir.iterdir())
        if main:  # (another rank removed the folder as rank 0 wrote into it, or made it first and rank 0 kept it)
            run_dir.mkdir(parents=True, exist_ok=True)
        try:
            if main:  # inside: a failed announcement (stdout on a full disk) leaves no run folder either
                out.print(f"Training [bold]{_plain(cfg.preset or 'custom')}[/] into {_plain(run_dir)} ({_plain(cfg.data.dataset)}, "
                          f"{cfg.data.resolution}px, sigma_blur_max={cfg.diffusion.sigma_blur_max:g}, {cfg.train.steps} steps)",
                          highlight=False)
            # (SIGTERM and SIGHUP before the loop takes them over, reading the data or compiling, stop like Ctrl-C:
            # user_errors)
            with _train_progress(cfg.train.steps, enabled=main) as progress:
                result = train(cfg, run_dir, resume=resume is not None, progress=progress)
        except RunLocked:  # the folder is the other training's now: never removed
            raise
        except BaseException:  # an error or Ctrl-C during start-up too: no checkpoint yet, no folder left
            if made is not None or found_empty:
                _remove_unstarted_run(run_dir, made)
            raise
        if main:
            how = f"Stopped by {result['stopped_by']}; checkpoint saved" if result["interrupted"] else "Done"
            loss = "no step logged" if math.isnan(result["loss"]) else f"loss {result['loss']:.4f}"
            out.print(f"{how} at step {result['step']} ({loss}): {_plain(run_dir / CHECKPOINT)}"
                      + (f"; resume with: bdm train --resume {_plain(run_dir)}" if result["interrupted"] else ""), highlight=False)
            for what in ("skipped_batches", "skipped_images"):
                if result[what]:
                    _say("[yellow]Warning:[/]", f"{result[what]} {what.replace('_', ' ')} (non-finite loss or unreadable files)")
        if result["interrupted"]:  # a scheduler must not mistake an interrupted run for a finished one
            raise typer.Exit(128 + signal.Signals[result["stopped_by"]].value)  # as the shell reports a signal's kill


def _nested(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are the same path or one holds the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _check_config_file(run_dir: Path, saved) -> int | None:
    """--resume continues the checkpoint's config and rewrites config.yaml from it: a config.yaml edited by hand
    would be silently ignored, then lost; refused instead, naming the first difference. train.steps aside: a resume
    with --steps writes it before its first checkpoint, and it may be edited to train on; returned (None if the
    file has none), as the steps the run was last asked to reach."""
    import yaml

    from .config import load_yaml, to_dict

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        mine = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        mine = None
    theirs = to_dict(saved)
    if not isinstance(mine, dict):
        raise UsageError(f"{path} is not the config this run wrote; --resume continues the checkpoint's own config and "
                         "rewrites config.yaml from it: move the file away to continue")
    for section, values in theirs.items():
        if not isinstance(values, dict):
            continue
        if not isinstance(mine.get(section) or {}, dict):
            raise UsageError(f"{path} was changed since the run wrote it ({section}: {mine[section]!r} there, a mapping "
                             "in the checkpoint); --resume continues the checkpoint's config: restore the file")
        for key, value in values.items():
            if (section, key) != ("train", "steps") and (mine.get(section) or {}).get(key, value) != value:
                how = ("start a new run for another model" if _fixed_on_resume(section, key)
                       else f"change it with --set {section}.{key}=...")
                raise UsageError(f"{path} was changed since the run wrote it ({section}.{key}: {mine[section][key]!r} there, "
                                 f"{value!r} in the checkpoint); --resume continues the checkpoint's config: restore the "
                                 f"file, then {how}")
    steps = (mine.get("train") or {}).get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise UsageError(f"{path}: train.steps is {steps!r}, not a whole number: restore it, or give --steps")
    return steps


class _Signalled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be: the command stops with 128 + its number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _naming_options(given: dict[str, str]):
    """Errors about a config key that an option set name the option (``--batch-size``, not ``train.batch_size``)."""
    try:
        yield
    except UserError as e:
        msg = str(e)
        for key, option in given.items():
            msg = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w])", option, msg)
        e.args = (msg,)
        raise


@contextlib.contextmanager
def _stopped_by_signals():
    """SIGTERM and SIGHUP raise :class:`_Signalled` (in the main thread; the training loop installs its own handlers,
    which save a checkpoint, and restores these)."""
    from .train import STOP_SIGNALS

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise _Signalled(signum)

    old = {s: signal.signal(s, stop) for s in STOP_SIGNALS if s != signal.SIGINT}  # Ctrl-C is KeyboardInterrupt already
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _remove_unstarted_run(run_dir: Path, made: Path | None) -> None:
    """A run folder this command made (with the folders above it that it made), that failed before its first
    checkpoint (a dataset that cannot be read, say), is not left behind: it holds only bdm's own files. ``made``
    None: the user's folder, empty when the run began, is emptied and kept (its files made the same command's
    next try a "run stopped before its first checkpoint")."""
    from .train import empty_unstarted_run

    if empty_unstarted_run(run_dir) and made is not None:
        with contextlib.suppress(OSError):
            run_dir.rmdir()
        remove_empty_folders(run_dir.parent, made)  # the empty folders above it that this command made


def _fixed_on_resume(section: str, key: str) -> bool:
    """What a checkpoint's weights and data statistics were made for: the network, the diffusion, the image shape."""
    return section in ("model", "diffusion") or (section, key) in (("data", "resolution"), ("data", "channels"))


def _check_resume_overrides(saved, cfg) -> None:
    """--set on --resume may change how training goes on (steps, lr, data location, sampling), not what the weights
    are for: a new network, schedule or image size would fail in the checkpoint, or train it for something else."""
    from .config import to_dict

    before, after = to_dict(saved), to_dict(cfg)
    for section, values in after.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if (section, key) == ("train", "seed") and before[section][key] != value:  # its streams go on
                    raise UsageError(f"train.seed cannot change on --resume: the run goes on with its own random "
                                     f"streams (seed {before[section][key]}), and its config must say so; start a new "
                                     f"run for seed {value}")
                if _fixed_on_resume(section, key) and before[section][key] != value:
                    raise UsageError(f"--set {section}.{key} cannot change on --resume: the run's weights were made for "
                                     f"{before[section][key]!r}; start a new run (bdm train --out NEW_DIR) for {value!r}")


MAX_PREVIEW = 2048  # blur-preview --size: a strip of 12 such tiles is already 100 MB
# blur-preview: --t values x size^2. The peak is about 100 bytes per tile pixel (measured at --size 1024: 0.95 GB with
# 2 values, 2.9 GB with 22), so this bound (the 11 default times at --size 2048, plus one) keeps it near 5 GB.
MAX_STRIP_PIXELS = 12 * 2048**2
MAX_PLOT = 512  # schedule-plot --size: 201 times x H x W log-SNRs in float64 (512: 420 MB)


def _check_out_dir(out_dir: Path | None, *files: Path | None, n: int = 0, inputs: list = ()) -> None:
    """``--out-dir`` holds one numbered PNG per sample: a folder (made if missing), never a file or a link, never an
    input's folder, no other output of the same command in it (a grid named 000001.png would replace sample 1), and
    no numbered sample already there: not under the names it would write (nothing already written is replaced), nor
    under others (a set that was partly removed, then sampled again with another seed, would mix two sets for FID)."""
    from .data import is_image_name

    if out_dir is None:
        return
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise UsageError(f"--out-dir {out_dir} exists and is not a directory")
    if (blocker := blocking_file(out_dir)) is not None:
        raise UsageError(f"--out-dir {out_dir}: {not_a_folder(blocker)}")
    for source in inputs:
        if Path(source).exists() and _nested(Path(source), out_dir):
            raise UsageError(f"--out-dir {out_dir} overlaps the input {source}: the samples would be read as input")
    for f in files:  # at any depth: bdm fid reads the folder's subfolders too
        if f is not None and _nested(f, out_dir):
            where = "is --out-dir itself" if f.resolve() == out_dir.resolve() else f"is inside --out-dir {out_dir}"
            raise UsageError(f"{f} {where}, which holds only the numbered samples: write it elsewhere")
    entries = list(os.scandir(out_dir)) if out_dir.is_dir() else []  # one listing, not n stats
    existing = {e.name for e in entries}
    taken = sorted(name for name in existing if re.fullmatch(r"\d{6,}\.png", name)) if n else []
    # bdm fid reads every image in the folder and below: others (000099.PNG, a.jpg, a subfolder's) would join the set
    others = sorted(e.name + ("/" if e.is_dir() else "") for e in entries if not re.fullmatch(r"\d{6,}\.png", e.name)
                    and (e.is_dir() or is_image_name(e.name)))
    if taken:
        clash = sum(int(name[:-4]) < n for name in taken)
        raise UsageError(f"--out-dir {out_dir} already holds {len(taken)} numbered samples ({taken[0]}, ...)"
                         + (f", {clash} of them under the names it would write" if clash else
                            ", which the new ones would join into one mixed set")
                         + ": choose an empty folder or remove them")
    if n and others:
        raise UsageError(f"--out-dir {out_dir} holds other images or folders ({others[0]}{', ...' if len(others) > 1 else ''}) "
                         "that bdm fid would score with the samples: choose an empty folder or move them")


@contextlib.contextmanager
def _numbered_samples(out_dir: Path | None):
    """Yields ``save(images, first)`` writing numbered PNGs into ``--out-dir`` (made if missing). A command that fails
    or is stopped before its last sample removes the ones it wrote, and the folders it made, so that the same
    command simply runs again (they would block it) and no half set is taken for a whole one."""
    from .io import TEMP_SUFFIX, save_numbered

    if out_dir is None:
        yield lambda images, first: None
        return
    made, written = first_missing(out_dir), []
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield lambda images, first: save_numbered(images, out_dir, first, written)
    except BaseException:
        # the files this command wrote, and the temporary file of the one a stop interrupted (.NAME.XXXX.bdm.tmp)
        for path in written + (list(out_dir.glob(f".{written[-1].name}.*{TEMP_SUFFIX}")) if written else []):
            with contextlib.suppress(OSError):
                path.unlink()
        remove_empty_folders(out_dir, made)
        raise


GRID_MAX = 1024  # samples shown in one grid PNG
RunOpt = Annotated[Optional[Path], typer.Option("--run", help="Run directory (default: the newest under ./runs).",
                                                 parser=_user_path)]
CkptOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="A checkpoint file instead of --run.", parser=_user_path)]


def _check_sampling(n: int, steps: int | None, sampler: str | None, grid: str | None, batch_size: int) -> None:
    from .engine import GRIDS, SAMPLERS

    if n <= 0:
        raise UsageError(f"--n must be positive, got {n}")
    if steps is not None and not 1 <= steps <= 4000:
        raise UsageError(f"--steps must be in 1..4000, got {steps}")
    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if grid is not None and grid not in GRIDS:
        raise UsageError(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size must be in 1..{MAX_BATCH}, got {batch_size}")
    if n > MAX_SAMPLES:
        raise UsageError(f"--n must be at most {MAX_SAMPLES:,}, got {n:,}")


@app.command("sample")
def sample_cmd(
    run: RunOpt = None,
    checkpoint: CkptOpt = None,
    n: Annotated[int, typer.Option("--n", help="Number of samples.")] = 64,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Grid PNG (default grid.png unless --out-dir).", parser=_output_file)] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Also write one PNG per sample here (for FID).", parser=_user_path)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps (default: the run's sample.steps).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ancestral | ddim | heun | dpmpp-2m | unipc (default: the run's).")] = None,
    grid: Annotated[Optional[str], typer.Option(help="uniform | logsnr | spectral (default: the sampler's).")] = None,
    seed: Annotated[int, typer.Option(help="Sample i depends only on (seed, i).", min=0, max=MAX_SEED)] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per batch (does not change the samples).")] = 64,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights instead of the EMA.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    bf16: Annotated[bool, typer.Option("--bf16", help="bf16 autocast in the network (CUDA, CPUs with native bf16).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the network (pays off for many batches on a GPU).")] = False,
    trajectory: Annotated[Optional[Path], typer.Option(help="Also write a strip of the predicted x over the steps for 8 samples.", parser=_output_file)] = None,
):
    """Draw samples from a trained run: a grid, and/or one PNG per sample."""
    import torch

    from .engine import nfe
    from .generate import find_checkpoint, load_run, sample_batches
    from .io import check_outputs, make_grid, save_image

    with user_errors():
        _one_process("sample")
        _check_sampling(n, steps, sampler, grid, batch_size)
        grid_path = out_path or (None if out_dir else Path("grid.png"))
        ckpt = find_checkpoint(run, checkpoint)
        _check_out_dir(out_dir, grid_path, trajectory, n=n, inputs=[ckpt])  # first: it names --out-dir's own files
        check_outputs(grid_path, trajectory, images=True, inputs=[ckpt])
        r = load_run(ckpt, ema=not no_ema, device=device)  # first: a bad checkpoint or device makes no folder
        k = steps or r.cfg.sample.steps
        name = sampler or r.cfg.sample.sampler
        picked = "" if run is not None or checkpoint is not None else f" of {_plain(ckpt.parent)} (the newest run)"
        out.print(f"Sampling {_count(n, 'image')} from step {r.step}{picked} ({_plain(r.cfg.preset)}, {name}, {_count(k, 'step')}, "
                  f"{_count(nfe(name, k), 'network call')} per batch)", highlight=False)
        images, snaps = [], {}  # snaps: step -> the predicted x of samples 0..7, from as many batches as hold them

        def snap(first: int, st) -> None:
            if trajectory is not None and first < TRAJECTORY_SAMPLES:  # (a --batch-size below 8 showed only its own)
                snaps.setdefault(st.i, []).append(st.denoised[: TRAJECTORY_SAMPLES - first].float().clamp(-1, 1).cpu())
            bar.update(task, advance=1)

        with _numbered_samples(out_dir) as save:  # a stop or failure here removes the samples it wrote
            with _progress("sample") as bar:
                task = bar.add_task("sample", total=-(-n // batch_size) * k)
                for b, x in enumerate(sample_batches(r, n, seed=seed, batch_size=batch_size, steps=steps, sampler=sampler,
                                                     grid=grid, bf16=bf16, callback=snap, compile=compile)):
                    save(x, b * batch_size)
                    if grid_path is not None and sum(map(len, images)) < GRID_MAX:
                        images.append(x[: GRID_MAX - sum(map(len, images))].clone())  # memory stays flat for any --n
            if grid_path is not None:
                save_image(make_grid(torch.cat(images)), grid_path)
                out.print(f"Wrote {_plain(grid_path)}" + (f" (the first {GRID_MAX} samples)" if n > GRID_MAX else ""), highlight=False)
            if trajectory is not None and snaps:
                snaps = [torch.cat(snaps[i]) for i in sorted(snaps)]
                pick = snaps[:: max(1, len(snaps) // 10)] + ([snaps[-1]] if (len(snaps) - 1) % max(1, len(snaps) // 10) else [])
                save_image(make_grid(torch.stack(pick, 1).flatten(0, 1), nrow=len(pick)), trajectory)
                out.print(f"Wrote {_plain(trajectory)}", highlight=False)
        if out_dir is not None:
            out.print(f"Wrote {n} PNGs to {_plain(out_dir)}", highlight=False)


@app.command("fid")
def fid_cmd(
    a: Annotated[Optional[str], typer.Argument(help="Folder or zip of images, .npz (mu/sigma, feats for KID), or cifar10-train / cifar10-test / digits.")] = None,
    b: Annotated[Optional[str], typer.Argument(help="The second input (omit with --save-stats or --run).")] = None,
    run: Annotated[Optional[Path], typer.Option("--run", help="Run directory whose samples to score against --ref.",
                                                parser=_user_path)] = None,
    checkpoint: CkptOpt = None,
    ref: Annotated[Optional[str], typer.Option(help="Reference for --run: any input form above.")] = None,
    n: Annotated[int, typer.Option("--n", help="Samples to draw with --run.")] = 50_000,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps with --run.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler with --run.")] = None,
    grid: Annotated[Optional[str], typer.Option(help="Time grid with --run.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed with --run.", min=0, max=MAX_SEED)] = 0,
    bf16: Annotated[bool, typer.Option("--bf16", help="With --run: bf16 autocast in the network (CUDA, CPUs with native bf16).")] = False,
    out_dir: Annotated[Optional[Path], typer.Option(help="With --run, also write the samples as PNGs here.", parser=_user_path)] = None,
    save_stats: Annotated[Optional[Path], typer.Option(help="Write mu/sigma (and the KID features) of the (first) input to this .npz.", parser=_output_file)] = None,
    dims: Annotated[int, typer.Option(help="Inception features: 2048 (standard), 768, 192 or 64.")] = 2048,
    inception_weights: Annotated[Optional[Path], typer.Option(help="FID Inception state dict (else $BDM_INCEPTION_WEIGHTS or pytorch-fid's download).", parser=_user_path)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per Inception batch.")] = 200,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decoding workers (default: cores, up to 8).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write cached dataset statistics.")] = False,
    kid_subsets: Annotated[int, typer.Option(help="KID: number of random subsets (mean and std over them).")] = 100,
    kid_subset_size: Annotated[int, typer.Option(help="KID: images per subset (capped at the smaller set's size).")] = 1000,
):
    """Frechet and Kernel Inception Distances between two image sets, or of a model's samples (--run) against --ref."""
    import os
    import warnings

    import numpy as np

    from . import fid
    from .config import MAX_WORKERS
    from .io import check_writable
    from .runtime import resolve_device

    with user_errors():
        _one_process("fid")
        dev = resolve_device(device)
        if not 0 < batch_size <= MAX_BATCH:
            raise UsageError(f"--batch-size must be in 1..{MAX_BATCH}, got {batch_size}")
        if workers is not None and not 0 <= workers <= MAX_WORKERS:
            raise UsageError(f"--workers must be in 0..{MAX_WORKERS}, got {workers}")
        if not 0 < kid_subsets <= MAX_KID_SUBSETS:  # clean-fid and torchmetrics use 100
            raise UsageError(f"--kid-subsets must be in 1..{MAX_KID_SUBSETS}, got {kid_subsets}")
        fid.check_dims(dims)  # here, not only where the Inception loads: two .npz inputs load none
        if kid_subset_size < 2:  # the unbiased estimate averages over pairs of distinct images
            raise UsageError(f"--kid-subset-size must be at least 2, got {kid_subset_size}")
        sampling = run is not None or checkpoint is not None
        if sampling:
            _check_sampling(n, steps, sampler, grid, batch_size)
            if n < 2:
                raise UsageError(f"FID needs at least 2 images, got --n {n}")
            if (ref or a) is None:
                raise UsageError("--run needs --ref (a folder, zip, .npz or named reference)")
            if b is not None or (ref is not None and a is not None):  # one would be silently left out
                raise UsageError("with --run the samples are the first set: give the reference once (--ref REF or one input)")
        else:
            given = [f"--{k.replace('_', '-')}" for k, v, default in (("n", n, 50_000), ("steps", steps, None),
                     ("sampler", sampler, None), ("grid", grid, None), ("seed", seed, 0), ("bf16", bf16, False),
                     ("out_dir", out_dir, None), ("ref", ref, None)) if v != default]
            if given:
                raise UsageError(f"{', '.join(given)} only {'apply' if len(given) > 1 else 'applies'} with --run or --checkpoint "
                                 "(sampling a model); between two inputs: bdm fid A B")
            if a is None or (b is None and save_stats is None):
                raise UsageError("give two inputs (bdm fid A B), one input with --save-stats, or --run with --ref")
        # inputs are names or paths (str): ~ expanded here, as a shell would
        a, b, ref = (str(user_path(s)) if s and s.startswith("~") else s for s in (a, b, ref))
        for source in (a, b, ref):
            if source is not None:
                fid.check_input(source)
                if source not in fid.NAMED_REFS and Path(source).suffix.lower() == ".npz" and Path(source).is_file():
                    fid.read_stats(Path(source), dims)  # its errors (--dims, say) before minutes on the other input
        if save_stats is not None:
            if save_stats.suffix.lower() != ".npz":
                raise UsageError(f"--save-stats {save_stats} does not end in .npz")
            check_writable(save_stats)
            # never write the statistics over an input (a checkpoint or weights file too), or into a folder being read
            for source in (a, b, ref, run, checkpoint, inception_weights or os.environ.get(fid.WEIGHTS_ENV) or None):
                if source is not None and Path(source).exists() and (
                        Path(source).resolve() == save_stats.resolve() or Path(source).resolve() in save_stats.resolve().parents):
                    raise UsageError(f"--save-stats {save_stats} would write into the input {source}")
        _check_out_dir(out_dir, save_stats, n=n if sampling else 0, inputs=[x for x in (a, b, ref, run, checkpoint) if x is not None])
        # statistics files need no network: the Inception (and its weights) only for images and samples
        images = sampling or any(s is not None and not (s not in fid.NAMED_REFS and Path(s).suffix.lower() == ".npz"
                                                        and Path(s).is_file()) for s in (a, b, ref))
        if sampling:  # the checkpoint's errors (none given, both given, not a checkpoint) before any work
            from .generate import find_checkpoint, load_run

            loaded = load_run(find_checkpoint(run, checkpoint), device=str(dev))
        model = fid.inception(dims, inception_weights, dev) if images else None
        opts = dict(dims=dims, device=dev, batch_size=batch_size, workers=workers, use_cache=not no_cache,
                    weights_id=fid.weights_id(inception_weights) if images else "")  # .npz inputs are never cached
        with warnings.catch_warnings():
            # the dataset's per-image warnings are counted and printed below, once; the cache's own warning stays
            warnings.filterwarnings("ignore", message="skipping unreadable image")
            with _progress("fid", enabled=images) as bar:
                task = bar.add_task("fid", total=None)

                counts: dict[str, int] = {}

                def counted(label: str):
                    def count(k: int) -> None:
                        counts[label] = k
                        bar.update(task, total=(bar.tasks[0].total or 0) + k)
                    return count

                progress = lambda k: bar.update(task, advance=k)  # noqa: E731
                second = (ref or a) if sampling else b
                # the reference first: an empty or unreadable one fails before minutes of sampling
                # the digits reference at the size the run was trained at (the digits preset's 16 otherwise)
                size = {"digits_size": loaded.cfg.data.resolution} if sampling else {}
                stats2 = fid.stats_of(second, model, progress=progress, on_count=counted("second input"), **opts,
                                      **size) if second else None
                if sampling:
                    stats1 = _fid_of_samples(loaded, n, steps, sampler, grid, seed, bf16, batch_size, out_dir, model,
                                             dims, dev, counted("first input"), progress)
                else:
                    stats1 = fid.stats_of(a, model, progress=progress, on_count=counted("first input"), **opts)
        for label, st in (("first input", stats1), ("second input", stats2)):
            count = counts.get(label, -1)
            if st is not None and 0 <= st[2] < count:
                _say("[yellow]Warning:[/]", f"{label}: {count - st[2]} of its {count} images could not be read and were "
                     "left out (damaged or not images)")
            if st is not None and 0 <= st[2] <= dims:  # a dims x dims covariance needs more than dims images
                _say("[yellow]Warning:[/]", f"{label} has {st[2]} images (<= {dims}, the feature dimensions): the "
                     "covariance is rank-deficient and FID is biased upward (KID is not)")
        if save_stats is not None:
            fid.save_stats(save_stats, *stats1)
            count = f"{stats1[2]} images" if stats1[2] >= 0 else "its input .npz records no image count"
            out.print(f"Wrote {_plain(save_stats)} ({count})", highlight=False)
        if stats2 is not None:
            value = fid.frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1])
            out.print(f"FID: {value:.4f}" if np.isfinite(value) else f"FID: {value}")
            _print_kid(stats1[3], stats2[3], kid_subsets, kid_subset_size)


def _print_kid(feats1, feats2, subsets: int, subset_size: int) -> None:
    """The KID line, or a one-line note why there is none: FID stands on its own, so a missing KID is no error."""
    from . import fid

    if feats1 is None or feats2 is None:
        which = "both inputs have" if feats1 is None and feats2 is None else f"the {'first' if feats1 is None else 'second'} input has"
        console.print(f"[yellow]Note:[/] KID skipped: {which} only mu/sigma (.npz); KID needs the Inception features, which "
                      "bdm fid IMAGES --save-stats FILE writes", highlight=False, soft_wrap=True)
    elif min(len(feats1), len(feats2)) < 2:
        console.print(f"[yellow]Note:[/] KID skipped: it needs at least 2 images in each set, got {len(feats1)} and {len(feats2)}",
                      highlight=False, soft_wrap=True)
    else:
        m = min(subset_size, len(feats1), len(feats2))
        if len(feats1) == len(feats2) == m:  # every subset would be both whole sets: one estimate, no spread to show
            mean, _ = fid.kernel_distance(feats1, feats2, subsets=1, subset_size=m)
            out.print(f"KID: {mean:.6f} (the whole sets, {m} images each: no more than the subset size "
                      f"{subset_size}, so no subsets to vary)", highlight=False)
            return
        if subsets == 1:  # one estimate: a std of 0 would read as a certain value
            mean, _ = fid.kernel_distance(feats1, feats2, subsets=1, subset_size=subset_size)
            out.print(f"KID: {mean:.6f} (one subset of {m} images: no spread to show)", highlight=False)
            return
        mean, std = fid.kernel_distance(feats1, feats2, subsets=subsets, subset_size=subset_size)
        out.print(f"KID: {mean:.6f} ± {std:.6f} (mean ± std over {subsets} subsets of {m} images)", highlight=False)


def _fid_of_samples(r, n, steps, sampler, grid, seed, bf16, batch_size, out_dir, model, dims, dev, counted, progress):
    """Sample from a loaded run and stream the samples, quantised as a PNG would hold them, into the Inception."""
    from . import fid
    from .generate import sample_batches

    counted(n)
    with _numbered_samples(out_dir) as save:
        def batches():
            for k, x in enumerate(sample_batches(r, n, seed=seed, batch_size=batch_size, steps=steps, sampler=sampler,
                                                 grid=grid, bf16=bf16)):
                save(x, k * batch_size)
                yield fid.as_inception_input(x)

        st = fid.features(model, batches(), dims, dev, progress)
    return (*st.result(), st.n, st.rows)


@contextlib.contextmanager
def _progress(label: str, enabled: bool = True):
    """A progress bar on stderr; not ``enabled``: one that shows nothing (no work to count, such as two .npz)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(show_speed=True),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  disable=not enabled) as bar:
        yield bar


@contextlib.contextmanager
def _train_progress(total: int, enabled: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if not enabled:
        yield None
        return
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("train", total=total, loss="-", ips="-")

        def update(info: dict) -> None:
            fields = {"loss": f"{info['loss']:.4f}", "ips": f"{info['images_per_s']:.0f}"} if "loss" in info else {}
            bar.update(task, completed=info["step"], **fields)

        yield update


def _reopen_closed_streams() -> set[int]:
    """Standard streams a caller closed (``>&-``) are opened on /dev/null: otherwise the next file bdm opens would get
    their number, and a print would land in a checkpoint. Returns the numbers that were closed."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            closed.add(fd)
    if 1 in closed:
        sys.stdout = open(1, "w", closefd=False)
    if 2 in closed:
        sys.stderr = open(2, "w", closefd=False)
    return closed


class _PipeSafe:
    """A standard stream whose reader may go away: standard output that a reader closes early (``bdm presets | head
    -1``), or standard error on a full disk or a dead terminal (``2>/dev/full``; there go only progress, warnings
    and errors). The rest is discarded and the work goes on (a training keeps training, and exits 0), instead of an
    exception that nothing could report. ``errors``: what counts as the reader gone."""

    def __init__(self, stream, errors: type[BaseException] | tuple = BrokenPipeError):
        self._stream, self._errors = stream, errors

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except self._errors:
            self._discard()
            return len(text)
        except OSError as e:  # standard output on a full disk: the result is lost, and the message says where
            self._lost(e)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except self._errors:
            self._discard()
        except OSError as e:
            self._lost(e)

    def _lost(self, e: OSError):
        self._discard()  # the unwritten rest must not fail again at exit
        raise UserError(f"cannot write to standard output ({e.strerror}): stopped there (any file already written is "
                        "complete)") from None

    def _discard(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, self._stream.fileno())  # also the interpreter's last flush at exit goes nowhere, quietly
        os.close(null)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one ``Warning:`` line, like errors, not Python's file, line number and source line."""
    _say("[yellow]Warning:[/]", str(message))


def _quiet_libraries() -> None:
    """What the libraries under bdm would print in their own formats, before torch loads: libgomp's two bare lines
    for an OMP_NUM_THREADS it cannot read (0, "abc", empty; dropped with one warning, torch then picks the count),
    and torch's note, as torch.compile starts on a machine without CUDA, that it found no CUDA runtime."""
    import logging

    value = os.environ.get("OMP_NUM_THREADS")
    if value is not None and not re.fullmatch(r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", value):
        del os.environ["OMP_NUM_THREADS"]
        warnings.warn(f"OMP_NUM_THREADS={value!r} is not a positive whole number (or a list of them): ignored")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _on_sigint(signum, frame) -> None:
    """Python's own Ctrl-C (a KeyboardInterrupt), remembered: one that lands inside an import leaves the module half
    made, and importing it again then fails with an error of its own, which must still read as the interruption."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


def run() -> None:
    """The ``bdm`` entry point: Click's own usage errors (an unknown option, a missing argument, ``--n 1.5``) also
    become one ``Error:`` line and exit 2, like bdm's, instead of a usage box. File names that are not UTF-8 are
    printed escaped, whatever the terminal's encoding (no UnicodeEncodeError after the work is done)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a caller ignores Ctrl-C (nohup, &)
        signal.signal(signal.SIGINT, _on_sigint)
    closed = _reopen_closed_streams()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    sys.stdout = _PipeSafe(sys.stdout)  # a full disk on stdout stays an error: the results would be lost
    sys.stderr = _PipeSafe(sys.stderr, OSError)
    warnings.showwarning = _warning_line
    _quiet_libraries()
    if 1 in closed:
        _error("standard output is closed (>&-); redirect it to a file or /dev/null instead")
        sys.exit(2)
    try:
        code = app(prog_name="bdm", standalone_mode=False)
    except Exception as e:
        # Ctrl-C while Click itself runs (its Abort), or, as in user_errors, an error that a Ctrl-C caused
        if isinstance(e, typer.Abort) or (INTERRUPTED.is_set() and not isinstance(e, typer.Exit)):
            console.print("[yellow]Interrupted.[/]")
            sys.exit(130)
        if isinstance(e, UserError):  # outside a command's own handling: --help or --version on a full stdout
            _error(str(e))
            sys.exit(1)
        if isinstance(e, (ImportError, MemoryError)):  # torch, which each command imports, under a low ulimit -v:
            text = _first_line(e)  # its libraries cannot be mapped
            _error(f"could not load the libraries bdm needs ({text}): raise the memory limit (ulimit -v), or reinstall "
                   "them (make test)")
            sys.exit(1)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):  # not one of Click's (Typer's) usage errors
            raise
        ctx = getattr(e, "ctx", None)
        if e.format_message():  # empty: `bdm` alone, which printed its help
            _error(f"{e.format_message()} (see `{ctx.command_path if ctx else 'bdm'} --help`)")
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    run()

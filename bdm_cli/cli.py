"""The ``bdm`` command line: one short function per command that validates input and calls the library."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .errors import UsageError, UserError

app = typer.Typer(
    name="bdm",
    help="Blurring Diffusion Models (Hoogeboom & Salimans, ICLR 2023): train, sample, inspect and score.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Preset name (see `bdm presets`) or a .yaml file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: section.key=value.")]


@contextlib.contextmanager
def user_errors():
    """Turn user errors into one line on stderr and a non-zero exit; real bugs keep their traceback."""
    try:
        yield
    except UserError as e:
        console.print(f"[bold red]Error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        raise typer.Exit(130) from None


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


def _t_values(ts: list[str] | None) -> list[float]:
    if not ts:
        return [round(0.1 * i, 1) for i in range(11)]
    values = []
    for raw in ts:
        for part in str(raw).split(","):
            try:
                t = float(part)
            except ValueError:
                raise UsageError(f"--t must be a number in [0, 1], got {part!r}") from None
            if not 0.0 <= t <= 1.0:
                raise UsageError(f"--t must be in [0, 1], got {t:g}")
            values.append(t)
    return values


def _diffusion_config(preset: str, sets: list[str] | None, sigma_blur_max: float | None, blur: str | None):
    from .config import load_config

    overrides = list(sets or [])
    if sigma_blur_max is not None:
        overrides.append(f"diffusion.sigma_blur_max={sigma_blur_max}")
    if blur is not None:
        overrides.append(f"diffusion.blur={blur}")
    return load_config(preset, overrides)


@app.command("blur-preview")
def blur_preview_cmd(
    image: Annotated[Path, typer.Argument(help="An image file (any format Pillow reads).")],
    t: Annotated[Optional[list[str]], typer.Option("--t", help="Times in [0, 1]; repeat or comma-separate. Default 0, 0.1, ..., 1.")] = None,
    preset: PresetOpt = "cifar10",
    sigma_blur_max: Annotated[Optional[float], typer.Option(help="Override the preset's blur strength.")] = None,
    blur: Annotated[Optional[str], typer.Option(help="Blur schedule: sin2 | linear.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Resolution (center crop + resize); default from the preset.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    no_noise: Annotated[bool, typer.Option("--no-noise", help="Only the pure-blur row.")] = False,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output PNG.")] = Path("blur_preview.png"),
    sets: SetOpt = None,
):
    """Show the forward process on a real image: z_t at each t, and the pure blur below it."""
    import torch

    from .data import load_image
    from .io import check_writable
    from .preview import blur_strip, save_strip

    with user_errors():
        ts = _t_values(t)
        cfg = _diffusion_config(preset, sets, sigma_blur_max, blur)
        resolution = size or cfg.data.resolution
        if resolution < 2:
            raise UsageError(f"--size must be at least 2, got {resolution}")
        check_writable(out_path)
        x = load_image(image, resolution, cfg.data.channels)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        rows = blur_strip(x, cfg.diffusion.schedule(), ts, noise, with_noise=not no_noise)
        save_strip(rows, ["original"] + [f"t={v:g}" for v in ts], out_path)
        d = cfg.diffusion
        out.print(f"Wrote {out_path} ({resolution}x{resolution}, sigma_blur_max={d.sigma_blur_max:g}, blur={d.blur}); "
                  f"t = {', '.join(f'{v:g}' for v in ts)}", highlight=False)


@app.command("schedule-plot")
def schedule_plot_cmd(
    preset: PresetOpt = "cifar10",
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (default schedule.png / .svg).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="png or svg.")] = "png",
    compare: Annotated[Optional[str], typer.Option(help="Comma-separated sigma_blur_max values to overlay, e.g. 0,10,20.")] = None,
    size: Annotated[Optional[int], typer.Option(help="Image size whose frequencies are plotted; default from the preset.")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="Also write the numbers to this CSV file.")] = None,
    sigma_blur_max: Annotated[Optional[float], typer.Option(help="Override the preset's blur strength.")] = None,
    blur: Annotated[Optional[str], typer.Option(help="Blur schedule: sin2 | linear.")] = None,
    sets: SetOpt = None,
):
    """Plot a_t, sigma_t, sigma_blur(t), alpha_t per frequency and the per-frequency log-SNR."""
    from dataclasses import replace

    from .io import check_writable
    from .preview import plot_schedule, write_schedule_csv

    with user_errors():
        if fmt not in ("png", "svg"):
            raise UsageError(f"--format must be png or svg, got {fmt!r}")
        cfg = _diffusion_config(preset, sets, sigma_blur_max, blur)
        schedule = cfg.diffusion.schedule()
        schedules = [schedule]
        if compare:
            try:
                values = [float(v) for v in compare.split(",") if v.strip()]
            except ValueError:
                raise UsageError(f"--compare must be comma-separated numbers, got {compare!r}") from None
            if not values or any(v < 0 for v in values):
                raise UsageError(f"--compare needs sigma_blur_max values >= 0, got {compare!r}")
            schedules = [replace(schedule, sigma_blur_max=v) for v in values]
        resolution = size or cfg.data.resolution
        if resolution < 2:
            raise UsageError(f"--size must be at least 2, got {resolution}")
        path = out_path or Path(f"schedule.{fmt}")
        check_writable(path)
        if csv_path:
            check_writable(csv_path)
        plot_schedule(schedules, resolution, resolution, path, fmt)
        out.print(f"Wrote {path}", highlight=False)
        if csv_path:
            write_schedule_csv(schedules, resolution, resolution, csv_path)
            out.print(f"Wrote {csv_path}", highlight=False)


@app.command("train")
def train_cmd(
    preset: PresetOpt = "digits",
    data: Annotated[Optional[str], typer.Option(help="digits, cifar10, a folder or a zip of images (data.dataset).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (default runs/<preset>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its checkpoint.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total training steps (train.steps).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (train.batch_size).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N (train.device).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of weights, data order, t and noise (train.seed).")] = None,
    sets: SetOpt = None,
):
    """Train a model; `torchrun --nproc_per_node N -m bdm_cli train ...` for several GPUs (or CPU processes)."""
    import os

    from .checkpoint import CHECKPOINT, checkpoint_config, load_checkpoint
    from .config import apply_overrides, load_config
    from .train import train

    overrides = list(sets or [])
    for key, value in (("data.dataset", data), ("train.steps", steps), ("train.batch_size", batch_size),
                       ("train.device", device), ("train.seed", seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    with user_errors():
        if resume:
            run_dir = resume
            cfg = apply_overrides(checkpoint_config(load_checkpoint(run_dir / CHECKPOINT)), overrides).validate()
        else:
            cfg = load_config(preset, overrides)
            run_dir = out_dir or Path("runs") / cfg.preset
            if (run_dir / CHECKPOINT).exists():
                raise UsageError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
            run_dir.mkdir(parents=True, exist_ok=True)
        main = int(os.environ.get("RANK", "0")) == 0
        if main:
            out.print(f"Training [bold]{cfg.preset or 'custom'}[/] into {run_dir} ({cfg.data.dataset}, "
                      f"{cfg.data.resolution}px, sigma_blur_max={cfg.diffusion.sigma_blur_max:g}, {cfg.train.steps} steps)",
                      highlight=False)
        with _train_progress(cfg.train.steps, enabled=main) as progress:
            result = train(cfg, run_dir, resume=resume is not None, progress=progress)
        if main:
            how = "Interrupted; checkpoint saved" if result["interrupted"] else "Done"
            out.print(f"{how} at step {result['step']} (loss {result['loss']:.4f}): {run_dir / CHECKPOINT}"
                      + (f"; resume with: bdm train --resume {run_dir}" if result["interrupted"] else ""), highlight=False)


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


def run() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())

"""What the forward process does to an image: ``bdm blur-preview`` and ``bdm schedule-plot``."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import torch

from .engine import BlurSchedule, dct2, diffuse, idct2
from .engine.checks import check_images, check_times, check_whole
from .io import atomic_write, atomic_write_bytes, to_uint8, write_image

__all__ = ["blur_strip", "save_strip", "schedule_table", "plot_schedule", "write_schedule_csv"]


def blur_strip(x: torch.Tensor, schedule: BlurSchedule, ts: list[float], noise: torch.Tensor, with_noise: bool = True):
    """Rows of images for one image ``x`` [C, H, W]: the original, then ``z_t`` at each t (Eq. 9, one
    shared ``noise``), and a row of pure blur ``IDCT(d_t DCT(x)) = IDCT(alpha_t DCT(x)) / a_t`` (alpha_t
    rescaled by a_t for display). Returns a list of rows, each [len(ts) + 1, C, H, W]."""
    check_images(x[None] if isinstance(x, torch.Tensor) and x.ndim == 3 else x, "x [C, H, W]")
    if not isinstance(noise, torch.Tensor) or noise.shape != x.shape:  # expand_as failed inside torch
        raise ValueError(f"noise must be a tensor of x's shape {tuple(x.shape)}, got {getattr(noise, 'shape', type(noise).__name__)}")
    t = torch.tensor(ts, dtype=torch.float64)
    check_times(t, "ts")
    xs = x.double().expand(len(ts), *x.shape)
    alpha, _ = schedule.alpha_sigma(t, x.shape[-2], x.shape[-1])
    a, _ = schedule.a_sigma(t)
    blurred = idct2(alpha / a.reshape(-1, 1, 1, 1) * dct2(xs)).float()
    rows = []
    if with_noise:
        z = diffuse(xs, t, noise.double().expand_as(xs), schedule).float()
        rows.append(torch.cat([x[None], z]))
    rows.append(torch.cat([x[None], blurred]))
    return rows


def save_strip(rows: list[torch.Tensor], labels: list[str], path: Path, tile: int = 128) -> Path:
    """Draw the rows as one PNG with a label over each column, tiles enlarged to ``tile`` px."""
    from PIL import Image, ImageDraw

    if not rows or any(not isinstance(r, torch.Tensor) or r.shape != rows[0].shape for r in rows):
        raise ValueError("rows must be one or more tensors of the same shape [N, C, H, W]")
    check_images(rows[0], "rows")
    n, c, h, w = rows[0].shape
    if len(labels) != n:  # a label short left a column unnamed; one too many was drawn past the strip
        raise ValueError(f"labels must name each of the {n} columns, got {len(labels)}")
    check_whole(tile, "tile", 1)
    if any(not bool(torch.isfinite(r).all()) for r in rows):  # NaN would be drawn as black tiles
        raise ValueError("rows must be finite: they hold NaN or inf")
    scale = max(1, tile // max(h, w))
    th, tw, pad, top = h * scale, w * scale, 4, 18
    canvas = Image.new("RGB", (n * (tw + pad) + pad, top + len(rows) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels):
        draw.text((pad + j * (tw + pad) + 2, 3), label, fill="black")
    for r, row in enumerate(rows):
        for j in range(n):
            arr = to_uint8(row[j].clamp(-1, 1)).permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[..., 0], "L") if c == 1 else Image.fromarray(arr, "RGB")
            img = img.resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(img, (pad + j * (tw + pad), top + pad + r * (th + pad)))
    return write_image(canvas, path)


def schedule_table(schedule: BlurSchedule, height: int, width: int, n: int = 201) -> dict[str, torch.Tensor]:
    """The schedule on ``n`` times in [0, 1]: base ``a``, ``sigma``, ``logsnr``, ``sigma_blur`` and
    ``alpha``/per-frequency log-SNR at the lowest (0, 0), a middle (H/2, W/2) and the highest
    (H-1, W-1) frequency."""
    check_whole(n, "n", 2)  # the times 0 and 1 at least (0 divided by zero, a negative n failed in torch)
    check_whole(height, "height"), check_whole(width, "width")
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    a, sigma = schedule.a_sigma(t)
    alpha, _ = schedule.alpha_sigma(t, height, width)
    picks = {"lowest": (0, 0), "middle": (height // 2, width // 2), "highest": (height - 1, width - 1)}
    out = {"t": t, "a": a, "sigma": sigma, "logsnr": schedule.logsnr(t), "sigma_blur": schedule.sigma_blur(t)}
    for name, (k, l) in picks.items():
        out[f"alpha_{name}"] = alpha[:, 0, k, l]
        out[f"logsnr_{name}"] = 2 * torch.log(alpha[:, 0, k, l] / sigma)
    return out


def write_schedule_csv(schedules: list[BlurSchedule], height: int, width: int, path: Path, n: int = 201) -> Path:
    with atomic_write(path, "w") as f:
        writer = None
        for sch in schedules:
            table = schedule_table(sch, height, width, n)
            if writer is None:
                writer = csv.writer(f)
                writer.writerow(["sigma_blur_max", *table])
            for i in range(n):
                writer.writerow([sch.sigma_blur_max, *(f"{float(v[i]):.8g}" for v in table.values())])
    return Path(path)


def plot_schedule(schedules: list[BlurSchedule], height: int, width: int, path: Path, fmt: str = "png") -> Path:
    """Schedules over t, alpha_t of three frequencies, and per-frequency log-SNR heatmaps, one per schedule."""
    # matplotlib's own defaults: a matplotlibrc in the working folder (text.usetex without LaTeX, say) must neither
    # break nor restyle the plot, nor print its bad lines as it is read (the plot ignores it); the caller's settings
    # and logging come back afterwards
    log = logging.getLogger("matplotlib")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    finally:
        log.setLevel(level)
    with plt.style.context("default"):
        return _plot_schedule(plt, schedules, height, width, path, fmt)


# one look per schedule, 16 in all (schedule-plot's --compare limit): 4 dash patterns x 4 markers
LINE_STYLES = [dict(ls=ls, marker=marker, markevery=0.1, markersize=4) for marker in ("", "o", "s", "^")
               for ls in ("-", "--", ":", "-.")]


def _plot_schedule(plt, schedules: list[BlurSchedule], height: int, width: int, path: Path, fmt: str) -> Path:
    ncols = max(2, len(schedules))
    fig = plt.figure(figsize=(5 * ncols, 8.5), layout="constrained")
    grid = fig.add_gridspec(2, ncols)
    ax_sched, ax_alpha = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1:])
    first = schedule_table(schedules[0], height, width)
    ax_sched.plot(first["t"], first["a"], color="C0", label="$a_t$")
    ax_sched.plot(first["t"], first["sigma"], color="C1", label=r"$\sigma_t$")
    ax_blur = ax_sched.twinx()
    for i, sch in enumerate(schedules):
        tab = schedule_table(sch, height, width)
        style = LINE_STYLES[i % len(LINE_STYLES)]  # (schedule-plot refuses more)
        ax_blur.plot(tab["t"], tab["sigma_blur"], color="C2", **style, label=rf"$\sigma_{{blur}}$ (max {sch.sigma_blur_max:g})")
        for j, name in enumerate(("lowest", "middle", "highest")):
            ax_alpha.plot(tab["t"], tab[f"alpha_{name}"], color=f"C{j}", **style,
                          label=f"{name} freq, " + rf"$\sigma_{{blur,max}}$={sch.sigma_blur_max:g}")
    ax_sched.set(xlabel="t", ylabel="base schedule", title="Cosine schedule and blur")
    ax_blur.set_ylabel(r"$\sigma_{blur}(t)$ (pixels)")
    lines = ax_sched.get_legend_handles_labels()[0] + ax_blur.get_legend_handles_labels()[0]
    ax_sched.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="center left")
    ax_alpha.set(xlabel="t", ylabel=r"$\alpha_t = a_t d_t$", title=f"Signal scale per frequency ({height}x{width})")
    ax_alpha.legend(fontsize=8)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    for i, sch in enumerate(schedules):
        ax = fig.add_subplot(grid[1, i])
        logsnr = sch.logsnr_freq(t, height, width)[:, 0]  # [T, H, W]
        lam = BlurSchedule.frequencies(height, width)
        order = torch.argsort(lam.flatten(), stable=True)
        heat = logsnr.reshape(len(t), -1)[:, order].T  # rows: frequencies by increasing lambda
        im = ax.imshow(heat.numpy(), aspect="auto", origin="lower", extent=(0, 1, 0, heat.shape[0]), cmap="viridis")
        ax.set(xlabel="t", ylabel="frequency (sorted by lambda)",
               title=rf"log-SNR per frequency, $\sigma_{{blur,max}}$={sch.sigma_blur_max:g} ({sch.blur})")
        fig.colorbar(im, ax=ax, label="log-SNR")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))

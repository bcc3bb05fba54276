"""Atomic file writes and image helpers shared by the commands.

Everything the tool writes goes to a temporary file in the target directory, is
flushed and fsynced, then renamed over the target, so an interruption never leaves
a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import UsageError, UserError
from .paths import blocking_file, not_a_folder

__all__ = ["OutputError", "naming", "atomic_write", "atomic_write_bytes", "remove_stale_temps", "to_uint8", "save_image", "save_numbered", "make_grid",
           "check_writable", "check_outputs", "image_format", "write_image"]


class OutputError(UserError):
    """An output path that cannot be written (missing or read-only directory)."""


def check_writable(path: Path) -> Path:
    """Fail early, with a clear message, if ``path`` is not a regular file bdm may replace (a directory, a device such
    as /dev/null, a symbolic link: renaming over them would destroy them or write somewhere unexpected) or its
    directory does not exist or is not writable."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link; bdm writes only regular files (remove the link or choose another name)")
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise OutputError(f"{path} is {kind}; give a file name to write to")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        blocker = parent if parent.exists() else blocking_file(path)
        if blocker is not None:
            raise OutputError(f"{not_a_folder(blocker)}: {path} cannot be written inside it")
        raise OutputError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory is not writable: {parent}")
    if path.is_file():  # an immutable or append-only file refuses even root; found now, not after the work
        try:
            os.close(os.open(path, os.O_WRONLY))  # opened, never written: the file stays as it is
        except PermissionError as e:
            raise OutputError(f"cannot write {path}: {e.strerror} (read-only, immutable or append-only?)") from None
    return path


def check_outputs(*paths: Path | None, images: bool = False, inputs=()) -> None:
    """Every output of one command: writable regular files (:func:`check_writable`), all different (two outputs of
    one command must not overwrite each other), none of them one of the command's ``inputs`` (an image, a
    checkpoint, a preset file), images with a known extension when ``images``."""
    given = [Path(p) for p in paths if p is not None]
    for p in given:
        check_writable(p)
        if images:
            image_format(p)
    resolved = [p.resolve() for p in given]
    if len(set(resolved)) < len(resolved):
        raise UsageError(f"two outputs of this command are the same file: {given[[resolved.count(r) for r in resolved].index(2)]}")
    for source in inputs:
        if source is not None and Path(source).exists() and Path(source).resolve() in resolved:
            raise UsageError(f"{source} is this command's input and cannot also be its output: write elsewhere")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".bdm.tmp"  # what remove_stale_temps may delete: only bdm's own temporary files


@contextlib.contextmanager
def naming(path: Path | str) -> Iterator[None]:
    """An OSError without a file name inside (a full disk or a file-size limit met by a write) names ``path``: the
    CLI's line then says which file."""
    try:
        yield
    except OSError as e:
        if not e.filename:
            e.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "wb", *, exclusive: bool = False) -> Iterator[io.IOBase]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``. ``exclusive``: never
    replace a file that exists by then (another process writing the same folder), an error instead."""
    path = check_writable(Path(path))
    # the name is cut so that a long (valid) output name still leaves room for the temporary one's additions
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:  # /proc, a read-only mount: the error names the output, not bdm's temporary file
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutputError(f"cannot write {path}: {e.strerror} (its folder {path.parent} takes no new files)") from None
    try:
        try:
            bits = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps its mode: a private checkpoint stays so
        except FileNotFoundError:
            bits = 0o666 & ~_umask()  # mkstemp makes 0600: a new file is like any other the user writes
        os.fchmod(fd, bits)
        with naming(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            _link_new(tmp, path) if exclusive else os.replace(tmp, path)
        except PermissionError as e:  # an immutable or append-only file or folder (even root may not rename there)
            raise OutputError(f"cannot write {path}: {e.strerror} (is it or its folder immutable or append-only?)") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _link_new(tmp: str, path: Path) -> None:
    """``tmp`` becomes ``path`` only if no ``path`` exists: a hard link fails where a rename would replace."""
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: claim the name first, then rename over the claim
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            os.replace(tmp, path)
            return
    except FileExistsError:
        raise OutputError(f"{path} was written by another process while bdm wrote this folder; give each run its own "
                          "--out-dir") from None
    os.unlink(tmp)


def remove_stale_temps(folder: Path, older_than: float = 0.0) -> int:
    """Delete the temporary files (``.NAME.XXXX.bdm.tmp``, bdm's own) that a killed writer left in ``folder``; returns
    how many. Call it only where no other writer is active (a run directory as its training starts), or with
    ``older_than`` seconds that no write takes (a shared cache folder)."""
    removed, now = 0, time.time()
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink() and now - p.stat().st_mtime >= older_than:
                p.unlink()
                removed += 1
    return removed


def atomic_write_bytes(path: Path | str, write: Callable[[io.IOBase], None], *, exclusive: bool = False) -> Path:
    with atomic_write(path, exclusive=exclusive) as f:
        write(f)
    return Path(path)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 exactly as a saved PNG holds them (round, clamp)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile [N, C, H, W] images into one [C, H', W'] image, ``nrow`` per row (default about sqrt(N))."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def image_format(path: Path | str) -> str:
    """The Pillow format an output's extension asks for; an unknown or missing extension is refused (never PNG bytes
    under a .jpg name)."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        # a usage error (exit 2), as schedule-plot's --out of another extension: the option's value is wrong
        raise UsageError(f"{path}: cannot tell the image format from its extension; use one of {', '.join(IMAGE_FORMATS)}")
    return fmt


MAX_SIDE = {"WEBP": 16383, "JPEG": 65500}  # what the encoders can write (PNG, BMP and TIFF: 2^31)


def write_image(img, path: Path | str, *, exclusive: bool = False) -> Path:
    """A PIL image to ``path`` in the format of its extension (JPEG at quality 95), atomically; a size that format
    cannot hold is refused before anything is encoded."""
    fmt = image_format(path)
    limit = MAX_SIDE.get(fmt)
    if limit and max(img.size) > limit:
        raise OutputError(f"{path}: a {img.size[0]} x {img.size[1]} image is larger than {fmt} can hold ({limit} px a "
                          "side); write it as .png")
    return atomic_write_bytes(path, lambda f: img.save(f, format=fmt, **({"quality": 95} if fmt == "JPEG" else {})),
                              exclusive=exclusive)


def save_image(image: torch.Tensor, path: Path | str, scale: int = 1, *, exclusive: bool = False) -> Path:
    """Save a [C, H, W] image in [-1, 1] (C = 1 or 3) in the format of ``path``'s extension, atomically; ``scale``
    enlarges it (nearest)."""
    from PIL import Image

    arr = to_uint8(image.detach().cpu())
    if scale > 1:
        arr = arr.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    arr = arr.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr, "RGB")
    return write_image(img, path, exclusive=exclusive)


def save_numbered(images: torch.Tensor, out_dir: Path, first: int, written: list[Path] | None = None) -> list[Path]:
    """Save a batch as ``{index:06d}.png`` from ``first`` on: the file of sample i holds sample i in any batching.
    Never over an existing file: two commands writing one folder at once stop with an error, not a mix of both.
    Each file is appended to ``written`` before it is written (a stop inside the batch leaves none unlisted), and
    taken off again if its name was another writer's. Returns ``written``."""
    written = [] if written is None else written
    for j, img in enumerate(images):
        written.append(Path(out_dir) / f"{first + j:06d}.png")
        try:
            save_image(img, written[-1], exclusive=True)
        except OutputError:  # the name is taken (another writer's file) or was never made: not ours to remove
            written.pop()
            raise
    return written

"""Images in, tensors out: decoding, RGB/grayscale conversion, center crop, resize, [-1, 1]."""

from __future__ import annotations

import contextlib
import io
import numbers
import os
import reprlib
import shutil
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .engine.checks import check_whole
from .errors import UsageError, UserError
from .paths import cache_home, first_missing, user_path

__all__ = ["DataError", "IMAGE_SUFFIXES", "is_image_name", "READ_ERRORS", "check_not_shadowed", "dataset_source", "image_names", "open_image", "to_8bit", "why_unreadable", "read_member", "shown", "load_image", "preprocess", "make_dataset", "collate_valid"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_name(name: str) -> bool:
    """Whether a file or zip member of this name is read as an image: an image suffix, and not one of macOS's
    AppleDouble twins (``._photo.png`` beside each file it copies to a FAT, exFAT or network drive, and everything
    under a zip's ``__MACOSX/``), which hold metadata: read, half a dataset failed to decode."""
    parts = name.replace("\\", "/").split("/")
    return (Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES and not parts[-1].startswith("._")
            and "__MACOSX" not in parts[:-1])


BUILTINS = ("digits", "cifar10")
SPLIT_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation", "dev"}
MAX_PIXELS = 8192 * 8192  # 67 megapixels, above any camera's photo: a larger declared size is refused before decoding
MAX_READ_SIDE = 4096  # the largest size bdm reads images at (blur-preview's --size: 2048): more would take gigabytes
MAX_JPEG_SCANS = 500  # libjpeg-turbo's guard against progressive "scan bombs" (TJPARAM_SCANLIMIT); encoders write ~10
# What reading one image (or zip member) can raise: a bad or truncated file, a corrupt deflate stream (zlib.error),
# an encrypted member (RuntimeError), an unsupported compression method (NotImplementedError).
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, RuntimeError, NotImplementedError, zlib.error,
               zipfile.BadZipFile)


class DataError(UserError):
    """Unreadable or missing data."""


def shown(name: str | Path) -> str:
    """A file name safe to print: bytes that are not UTF-8 (kept by Python as surrogates) shown as escapes."""
    return str(name).encode("utf-8", "backslashreplace").decode("utf-8")


MAX_MEMBER_BYTES = 256 << 20  # a zip member is read whole: one larger than any image file is refused from its size


def read_member(z, name: str) -> bytes:
    """A zip member's bytes, its declared size checked first (a 500 KB zip can hold 500 MB of zeros)."""
    size = z.getinfo(name).file_size
    if size > MAX_MEMBER_BYTES:
        raise OSError(f"{shown(name)} is {size:,} bytes uncompressed, more than an image file ({MAX_MEMBER_BYTES:,})")
    return z.read(name)


def why_unreadable(e: BaseException) -> str:
    """Why an image could not be read, for a warning line: bdm's own reasons as they are, others with their kind."""
    return shown(e) if isinstance(e, DataError) else f"{type(e).__name__}: {shown(e)}"


def open_image(fp, name: str | Path):
    """``Image.open`` with the declared size checked before anything is decoded (at most :data:`MAX_PIXELS`)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # Pillow's own check (a warning, then its own error at twice its limit) is this one
    try:
        img = Image.open(fp)
    except Image.UnidentifiedImageError:  # its message holds the repr of the file object
        raise DataError("not an image format Pillow reads: empty, damaged or another kind of file") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise DataError(f"{shown(name)} declares {w} x {h} pixels, more than the {MAX_PIXELS:,} bdm reads (a decompression "
                        "bomb, or a picture to shrink first)")
    if img.format == "JPEG" and img.info.get("progressive") and (scans := _jpeg_scans(img.fp)) > MAX_JPEG_SCANS:
        img.close()
        raise DataError(f"{shown(name)} is a progressive JPEG of {scans:,} scans, more than the {MAX_JPEG_SCANS} bdm decodes "
                        "(each scan decodes the whole picture again: minutes for one small file)")
    return img


def _jpeg_scans(fp) -> int:
    """The scans of a JPEG: its start-of-scan (SOS) segments, found by walking the marker segments by their lengths
    (metadata such as ICC profiles, EXIF and comments is skipped whole: an FF DA inside it is no scan) and, after
    each scan's header, its entropy-coded data to the next marker (where every FF is stuffed with 00, or a restart
    marker). Reads the file once and leaves its position as it was."""
    at = fp.tell()
    fp.seek(0)
    data = fp.read()
    fp.seek(at)
    scans, i = 0, 2  # after SOI
    while i + 4 <= len(data):
        if data[i] != 0xFF:  # entropy-coded data: on to the next FF
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before a marker
            i += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # a stuffed FF, TEM, a restart: no length
            i += 2
        elif marker == 0xD9:  # EOI
            break
        else:
            scans += marker == 0xDA
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")  # the segment (SOS: its header; its data follows)
    return scans


def to_8bit(img):
    """Any image as 8-bit ``L`` or ``RGB``, as training and FID both read it: float pixels in [0, 1] or 0..255,
    16-bit ones scaled to 8, transparency over white, other colour spaces (CMYK, YCbCr, LAB, HSV) as RGB."""
    from PIL import Image

    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():  # one NaN would make max() NaN and the whole image black
            raise ValueError(f"{np.size(arr) - np.isfinite(arr).sum()} of its pixels are not finite numbers (NaN or inf)")
        # [0, 1] (HDR/scientific TIFFs; highlights above 1 are clipped) or 0..255: told apart by the 99th percentile,
        # so that one bright pixel does not turn a [0, 1] image into a black 0..255 one
        scale = 255.0 if np.percentile(arr, 99) <= 1.0 else 1.0
        if arr.min() < -0.5 or arr.max() > 255.5:  # neither range: clipping would be a guess
            raise ValueError(f"its float pixels run from {arr.min():.4g} to {arr.max():.4g}, outside [0, 1] and 0..255: "
                             "save it as 8 or 16 bits")
        img = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8))
    if img.mode.startswith("I"):
        # 16-bit: 0..65535 maps to 0..255 (65535 / 257 = 255); 32-bit 'I' holding 8-bit values stays as is.
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8))
    if img.mode in ("RGBa", "La"):  # premultiplied alpha converts only to its plain form
        img = img.convert(img.mode[:-1] + "A")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)  # transparent areas become white, not black
    return img if img.mode in ("L", "RGB") else img.convert("RGB")  # LAB converts to RGB only, not to L


def check_image_args(resolution, channels) -> None:
    """The size and channels images are read at: a whole number of pixels up to :data:`MAX_READ_SIDE`, and 1 (grey)
    or 3 (RGB) channels (2, 4 or 0 gave RGB silently; a size of 0 failed inside Pillow; 10^6 took 23 GB)."""
    check_whole(resolution, "resolution", 1, MAX_READ_SIDE)
    if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {reprlib.repr(channels)}")


def preprocess(img, resolution: int, channels: int = 3) -> torch.Tensor:
    """A PIL image to a [C, R, R] float tensor in [-1, 1]: convert mode, center-crop to a square,
    resize with antialiasing (as EDM's dataset tool and ADM do)."""
    from PIL import Image, ImageOps

    check_image_args(resolution, channels)
    if not isinstance(img, Image.Image):
        raise TypeError(f"preprocess takes a PIL image, got {type(img).__name__}")
    if 0 in img.size:
        raise DataError(f"the image is empty ({img.size[0]} x {img.size[1]} pixels)")

    # draft() lets JPEG decode at a reduced scale: huge photos never decode at full size.
    img.draft("L" if channels == 1 else "RGB", (resolution, resolution))
    img = ImageOps.exif_transpose(img)  # a phone's portrait photo is stored sideways with an orientation tag
    img = to_8bit(img).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        # reducing_gap: big images are first shrunk by an integer factor, so time and memory stay bounded.
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC if side < resolution else Image.Resampling.LANCZOS,
                         reducing_gap=3.0)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1


def load_image(path: Path | str, resolution: int, channels: int = 3) -> torch.Tensor:
    """Read one image file as a [C, R, R] tensor in [-1, 1], with clear errors for bad files."""
    from PIL import Image

    check_image_args(resolution, channels)
    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {shown(path)}")
    if path.is_dir():
        raise DataError(f"expected an image file, got a directory: {shown(path)}")
    if not path.is_file():
        raise DataError(f"{shown(path)} is not a regular file (a pipe or device?)")
    try:
        with open_image(path, path) as img:
            if min(img.size) < resolution:  # a 1 x 50 picture previews as one colour: say why
                warnings.warn(f"{shown(path)} is {img.size[0]} x {img.size[1]} pixels: its centre square "
                              f"({min(img.size)} px) is enlarged to {resolution} px", stacklevel=1)
            return preprocess(img, resolution, channels)
    except (*READ_ERRORS, Image.DecompressionBombError, DataError) as e:
        raise DataError(f"cannot read {shown(path)} as an image ({why_unreadable(e)})") from None


# -- datasets -------------------------------------------------------------------------

def collate_valid(batch: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack the images of a batch, leaving out the ones that could not be decoded (None)."""
    kept = [x for x in batch if x is not None]
    if not kept:
        return torch.empty(0)
    return torch.stack(kept)


class TensorImages(torch.utils.data.Dataset):
    """Images already in memory, [N, C, R, R] in [-1, 1] (the bundled digits)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class FileImages(torch.utils.data.Dataset):
    """Image files in a folder or a zip, decoded on demand (in DataLoader workers)."""

    def __init__(self, source: Path, names: list[str], resolution: int, channels: int):
        self.source, self.names, self.resolution, self.channels = source, names, resolution, channels
        self._zip, self._pid = None, None  # opened lazily, once per process

    def __len__(self) -> int:
        return len(self.names)

    def _open(self, name: str):
        if self.source.is_dir():
            return open(self.source / name, "rb")
        if self._zip is None or self._pid != os.getpid():
            # A forked DataLoader worker must not share the parent's handle: the file offset is shared too.
            self._zip, self._pid = zipfile.ZipFile(self.source), os.getpid()
        return io.BytesIO(read_member(self._zip, name))

    def __getitem__(self, i: int) -> torch.Tensor | None:
        """The image, or None (with a warning) if it cannot be decoded: a corrupt file is skipped, never fatal."""
        from PIL import Image

        name = self.names[i]
        try:
            with self._open(name) as f, open_image(f, name) as img:
                return preprocess(img, self.resolution, self.channels)
        except (*READ_ERRORS, Image.DecompressionBombError, DataError) as e:
            warnings.warn(f"skipping unreadable image {shown(name)} in {shown(self.source)} ({why_unreadable(e)})",
                          stacklevel=1)
            return None

    def header(self, i: int) -> tuple[str, tuple[int, int]] | None:
        """Image i's mode and size as stored, from its header (None if it cannot be read: it is skipped when it is
        loaded)."""
        try:
            with self._open(self.names[i]) as f, open_image(f, self.names[i]) as img:
                return img.mode, img.size
        except (*READ_ERRORS, DataError):
            return None

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}  # zip handles do not cross process boundaries


def image_names(source: Path, split: str) -> list[str]:
    """The images of a folder (recursive) or zip, under ``split/`` if that exists, sorted by their relative
    '/'-separated paths (a zip's by its member names, which Windows tools may write with '\\')."""

    members = {}  # a zip's member names as written by Windows tools ("train\\0.png"), by their '/'-separated names
    if source.is_dir():
        names = sorted(_image_files(source))
    elif zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as z:
                images = [n for n in z.namelist() if is_image_name(n)
                          and not n.endswith("/")]  # a folder entry named like an image (d.png/)
            members = {n.replace("\\", "/"): n for n in images}
            if len(members) < len(images):  # zipfile reads only the last of members with one name
                dup = next(n for n, k in Counter(n.replace("\\", "/") for n in images).items() if k > 1)
                raise DataError(f"the zip {shown(source)} holds several members named {shown(dup)!r}; only one could be read")
            names = sorted(members)
        except (*READ_ERRORS, zipfile.LargeZipFile) as e:
            raise DataError(f"cannot read the zip {shown(source)}: its directory is damaged ({type(e).__name__}: {shown(e)})") from None
    else:
        raise DataError(f"not a folder or a zip of images: {shown(source)}")
    if split:
        prefix = split.strip("/") + "/"
        # A split is a top-level folder, possibly under one root folder (as in cifar10-jpeg.zip); under several (each
        # class folder holding its own train/, say) taking the first would silently drop the others.
        nested = sorted({n.split("/", 1)[0] + "/" + prefix for n in names if "/" in n and n.split("/", 1)[1].startswith(prefix)})
        if not any(n.startswith(prefix) for n in names) and len(nested) > 1:
            raise DataError(f"{shown(source)} has {split!r} folders under several folders ({', '.join(nested[:3])}...): a split "
                            "must be one top-level folder (or under one root folder); rearrange it, or --set data.split= "
                            "for every image")
        for candidate in (prefix, *nested):
            chosen = [n for n in names if n.startswith(candidate)]
            if chosen:
                names = chosen
                break
        else:
            # No such folder: a plain folder of images (or of class folders) is used whole, but one that holds other
            # splits is not: training on its test images silently would be wrong.
            splits = sorted({part for n in names for part in n.split("/")[:2][:-1] if part.lower() in SPLIT_NAMES})
            if splits:
                raise DataError(f"{shown(source)} has no {split!r} folder but has {', '.join(splits)}: choose one with "
                                f"--set data.split=NAME, or --set data.split= for every image")
            if split.strip("/") != "train":  # only the default falls back to every image: another name was meant
                raise DataError(f"{shown(source)} has no {split!r} folder: --set data.split= for every image")
    if not names:
        zips = _nested_zips(source)
        raise DataError(f"no images found in {shown(source)}" + (f" (split {split!r})" if split else "")
                        + (f"; it holds {zips} .zip file{'s' * (zips > 1)}, which bdm does not open inside a folder or "
                           f"zip: unpack {'them' if zips > 1 else 'it'}, or give one as the dataset" if zips else ""))
    return [members.get(n, n) for n in names]


def _nested_zips(source: Path) -> int:
    """How many .zip files a dataset folder or zip holds (for the message when it has no images: they are not read)."""
    with contextlib.suppress(*READ_ERRORS, zipfile.LargeZipFile):
        if source.is_dir():
            return sum(f.lower().endswith(".zip") for _, _, files in os.walk(source) for f in files)
        with zipfile.ZipFile(source) as z:
            return sum(n.lower().endswith(".zip") for n in z.namelist())
    return 0


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` as '/'-separated relative names, following symbolic links to folders (a dataset
    assembled from links; each real folder read once, so a link loop ends) and saying which folders cannot be read."""
    def unreadable(e: OSError) -> None:
        warnings.warn(f"skipping unreadable folder {shown(e.filename)} ({why_unreadable(e)})", stacklevel=1)

    names, seen, top = [], set(), os.path.realpath(folder)
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen or (real != top and top.startswith(real.rstrip(os.sep) + os.sep)):
            if real not in seen:  # a link up the tree (`up -> ..`): the dataset's own folders, its siblings, its runs
                warnings.warn(f"skipping {shown(root)}: a link to a folder that holds the dataset", stacklevel=1)
            dirs[:] = []
            continue
        seen.add(real)
        if {"checkpoint.pt", "config.yaml"} <= set(files):  # a bdm run (reached by a link, say): its grids are no data
            warnings.warn(f"skipping {shown(root)}: a bdm run's folder", stacklevel=1)
            dirs[:] = []
            continue
        rel = Path(root).relative_to(folder)
        names += [(rel / f).as_posix() for f in files
                  if is_image_name(f) and os.path.isfile(os.path.join(root, f))]
    return names


def load_digits(resolution: int, channels: int) -> torch.Tensor:
    """scikit-learn's bundled 8x8 digits (1,797 real images, no download), resized, in [-1, 1]."""
    from PIL import Image
    from sklearn.datasets import load_digits as sk_digits

    images = sk_digits().images  # [1797, 8, 8], values 0..16
    out = [preprocess(Image.fromarray((img * (255 / 16)).round().astype(np.uint8), "L"), resolution, channels) for img in images]
    return torch.stack(out)


def cifar10_uint8(split: str, *, local_copy: str = "point --data at a local copy: a folder or zip of images, e.g. "
                  "--data ../shared/data/cifar10-jpeg.zip"):
    """CIFAR-10's ``train`` or ``test`` images, uint8 [N, 32, 32, 3], through torchvision (downloaded once into
    $BDM_DATA_DIR, else ~/.cache/bdm). A folder it had to create is removed again when the download fails;
    ``local_copy`` then says how the command at hand takes a copy instead (train's --data, fid's input)."""
    from torchvision.datasets import CIFAR10

    _check_cifar10_split(split)
    root = user_path(os.environ.get("BDM_DATA_DIR") or cache_home())
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is not a folder: set BDM_DATA_DIR to the folder that holds (or will hold) CIFAR-10")
    made = first_missing(root)
    try:
        return CIFAR10(str(root), train=split == "train", download=True).data
    except Exception as e:  # offline: urllib raises several error types
        if made is not None:  # the folders this command made (and a partial download in them) are not left behind
            shutil.rmtree(made, ignore_errors=True)
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({type(e).__name__}): {local_copy}, or set "
            "BDM_DATA_DIR to a folder holding cifar-10-batches-py"
        ) from None


def _check_cifar10_split(split: str) -> None:
    if split not in ("train", "test"):  # torchvision's flag would read any other name as the training set
        raise DataError(f"cifar10 has the splits train and test, got data.split {split!r}")


def check_not_shadowed(name: str, builtins) -> None:
    """A built-in dataset's name that is also a file or folder here is ambiguous: refused, never guessed."""
    if name in builtins and os.path.lexists(name):
        raise DataError(f"{name!r} names both a built-in dataset and a {'folder' if os.path.isdir(name) else 'file'} here: "
                        f"pass ./{name} for yours, or run from another folder for the built-in one")


def dataset_source(dataset: str, split: str = "train") -> Path | None:
    """What ``data.dataset`` names, checked before anything is read or made: None for a built-in dataset, else the
    folder or zip of images (which must exist and be one of those)."""
    check_not_shadowed(dataset, BUILTINS)
    if dataset == "cifar10":
        _check_cifar10_split(split)
    if dataset == "digits" and split not in ("train", ""):
        raise DataError(f"digits has no splits (data.split train or empty: all 1,797 images), got {split!r}")
    if dataset in BUILTINS:
        return None
    if not dataset.strip():  # Path("") is the current folder
        raise UsageError("no dataset given (data.dataset is empty: an unset shell variable in --data?): pass a folder "
                        "or zip of images, digits or cifar10")
    source = user_path(dataset)
    if not source.exists():
        raise DataError(f"dataset not found: {shown(source)} (expected digits, cifar10, a folder or a zip of images)")
    if not (source.is_dir() or source.is_file()):
        raise DataError(f"{shown(source)} is neither a folder nor a regular file (a pipe or device?)")
    return source


def make_dataset(dataset: str, resolution: int, channels: int = 3, split: str = "train") -> torch.utils.data.Dataset:
    """``digits``, ``cifar10`` (torchvision, cached under $BDM_DATA_DIR or ~/.cache/bdm), or a folder / zip of images."""
    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be digits, cifar10 or a path (str or os.PathLike), got {type(dataset).__name__}")
    check_image_args(resolution, channels)
    source = dataset_source(dataset, split)
    if dataset == "digits":
        return TensorImages(load_digits(resolution, channels))
    if dataset == "cifar10":
        from PIL import Image

        _warn_if_grey("cifar10", "RGB", channels)
        images = cifar10_uint8(split)
        return TensorImages(torch.stack([preprocess(Image.fromarray(a), resolution, channels) for a in images]))
    images = FileImages(source, image_names(source, split), resolution, channels)
    # a few headers, spread over the dataset (its first image may be the one grey one, or the one small one)
    headers = [h for k in sorted({round(k * (len(images) - 1) / 7) for k in range(8)}) if (h := images.header(k))]
    _warn_if_grey(shown(source), next((mode for mode, _ in headers if mode in COLOUR_MODES), None), channels)
    small = [size for _, size in headers if min(size) < resolution]
    if small:  # a 1 x 1000 strip becomes one flat colour: as blur-preview's load_image says for one image
        warnings.warn(f"{len(small)} of {len(headers)} images looked at in {shown(source)} are smaller than "
                      f"data.resolution {resolution} (such as {small[0][0]} x {small[0][1]}): their centre squares are "
                      "enlarged, blurry or flat", stacklevel=1)
    return images


def dataset_fingerprint(data: torch.utils.data.Dataset) -> str:
    """The image count and, for files, a hash of their names: a run stores it, and its resume says when the images
    under the same dataset path changed (the data order and the stored statistics are then the old images')."""
    import hashlib

    names = getattr(data, "names", None)
    digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()[:16] if names else ""
    return f"{len(data)} images" + (f", names {digest}" if digest else "")


COLOUR_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV")


def _warn_if_grey(what: str, mode: str | None, channels: int) -> None:
    """A colour dataset under a 1-channel config (the digits presets) is trained as grey: said once, not silently."""
    if channels == 1 and mode in COLOUR_MODES:
        warnings.warn(f"{what} holds colour images ({mode}) and data.channels is 1: they are trained as grey "
                      "(set data.channels=3 to keep their colour)", stacklevel=2)

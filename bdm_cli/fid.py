"""FID and KID with pytorch-fid's InceptionV3 (the TF FID weights), streamed, cached, and exact to pytorch-fid.

Images go through the same path as ``python -m pytorch_fid``: decoded by PIL, converted to RGB,
``ToTensor`` (uint8 / 255), resized to 299 by the network (bilinear), pool3 features; the statistics
are the mean and the (n - 1)-normalised covariance. The Frechet distance uses a symmetric
eigendecomposition instead of ``scipy.linalg.sqrtm`` (whose ``disp`` argument scipy 1.18 removed).

The Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", ICLR 2018) is computed on the
same features as clean-fid and torchmetrics compute it: the unbiased MMD^2 with the cubic polynomial kernel,
mean and standard deviation over random subsets. Its subsets are drawn from a uniform reservoir sample of the
feature rows, so memory stays flat for any number of images.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import pickle
import reprlib
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .data import (READ_ERRORS, DataError, check_not_shadowed, cifar10_uint8, image_names, open_image, read_member, shown,
                   to_8bit, why_unreadable)
from .errors import UsageError, UserError
from .io import atomic_write, remove_stale_temps
from .paths import cache_home, first_missing, user_path

__all__ = ["frechet_distance", "kernel_distance", "polynomial_mmd", "kid_subsets", "FeatureStats", "inception", "stats_of",
           "check_stats", "check_dims", "ImageSource", "NAMED_REFS", "WEIGHTS_ENV", "weights_id"]

WEIGHTS_ENV = "BDM_INCEPTION_WEIGHTS"
# pytorch-fid.inception.FID_WEIGHTS_URL, here so that cache keys need no pytorch-fid import
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
NAMED_REFS = ("cifar10-train", "cifar10-test", "digits")
DIMS = (64, 192, 768, 2048)
DECODING = "v2"  # part of a folder's cache key: statistics of images decoded otherwise are never reused
RESERVOIR = 10_000  # feature rows kept for KID: 100 subsets of 1,000 draw from these (80 MB at 2048 dims, float32)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` with ``tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``:
    the symmetric form is exact for PSD matrices, rank-deficient ones included, and needs no sqrtm."""
    arrays = [np.asarray(a) for a in (mu1, sigma1, mu2, sigma2)]
    if any(a.dtype.kind not in "fiu" or not np.isfinite(a).all() for a in arrays):  # max(0, nan) below would be 0
        raise UserError("FID of statistics that are not finite real numbers (NaN, inf, complex or objects)")
    mu1, mu2 = (np.atleast_1d(a.astype(np.float64)) for a in arrays[::2])
    s1, s2 = (np.atleast_2d(a.astype(np.float64)) for a in arrays[1::2])
    if mu1.ndim != 1 or s1.shape != (len(mu1),) * 2 or mu2.shape != mu1.shape or s2.shape != s1.shape:
        raise UserError(f"statistics of different dimensions: mu {mu1.shape} with sigma {s1.shape}, mu {mu2.shape} "
                        f"with sigma {s2.shape}")
    if len(mu1) == 0:
        raise UserError("FID of statistics with no dimensions")
    too_large = UserError("FID of statistics too large to compute in float64 (their sums overflow): a damaged or "
                          "hand-made .npz, or no Inception's features")
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            w, v = np.linalg.eigh((s1 + s1.T) / 2)
            eig2 = np.linalg.eigvalsh((s2 + s2.T) / 2)
        except np.linalg.LinAlgError:  # eigh does not converge on matrices of inf and NaN
            raise too_large from None
        for which, eig in (("first", w), ("second", eig2)):
            if eig.min() < -1e-6 * max(1.0, eig.max()):  # rounding gives about -1e-12; clipping more would hide it
                raise UserError(f"the {which} statistics' sigma is not a covariance matrix (an eigenvalue of "
                                f"{eig.min():.3g}): a damaged or hand-made .npz")
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = root1 @ s2 @ root1
        try:
            tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
        except np.linalg.LinAlgError:
            raise too_large from None
        diff = mu1 - mu2
        value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    if not np.isfinite(value):  # inf - inf: max(0, nan) below would be a perfect 0
        raise too_large
    return max(0.0, value)  # >= 0; below is rounding


def polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size feature sets under the cubic polynomial kernel
    ``k(a, b) = (a.b / d + 1)^3`` (Binkowski et al. 2018, eq. 2 with their default kernel).

    The within-set sums leave out the diagonal ``k(x_i, x_i)``, whose expectation is not ``E k(x, x')``: that is
    what makes the estimate unbiased (it can be negative when the sets are alike). The cross term keeps all m^2
    pairs, as Binkowski et al.'s code, clean-fid and torchmetrics do (their "unbiased", not the "u-statistic")."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != x.shape or len(x) < 2:
        raise ValueError(f"polynomial_mmd needs two 2-D sets of the same shape with at least 2 rows, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("polynomial_mmd of features that are not finite (NaN or inf)")
    m, d = x.shape
    if d == 0:
        raise ValueError("polynomial_mmd of features with no dimensions")
    with np.errstate(over="ignore", invalid="ignore"):
        k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        value = float(within - 2 * k_xy.sum() / (m * m))
    if not np.isfinite(value):
        raise ValueError("polynomial_mmd of features too large to compute in float64 (the kernel's sums overflow)")
    return value


def kid_subsets(n1: int, n2: int, *, subsets: int = 100, subset_size: int = 1000,
                seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The row indices of each KID subset: ``subsets`` pairs of ``min(subset_size, n1, n2)`` indices into each set,
    each drawn without replacement (as torchmetrics' ``randperm(n)[:m]``), from one seeded numpy Generator."""
    for name, value in (("subsets", subsets), ("subset_size", subset_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UsageError(f"KID's {name} must be a whole number, got {reprlib.repr(value)}")
    if seed < 0:
        raise UsageError(f"KID's seed must be >= 0, got {seed}")
    if subsets < 1 or subset_size < 2:
        raise UsageError(f"KID needs at least 1 subset of at least 2 images, got {subsets} subsets of {subset_size}")
    if min(n1, n2) < 2:
        raise UserError(f"KID needs at least 2 images in each set, got {n1} and {n2}")
    m = min(subset_size, n1, n2)
    rng = np.random.default_rng(seed)
    for _ in range(subsets):
        yield rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)


def kernel_distance(feats1, feats2, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): ``(mean, std)`` of :func:`polynomial_mmd` over
    ``subsets`` random subsets of ``min(subset_size, n1, n2)`` rows of each set (:func:`kid_subsets`).

    Defaults are torchmetrics' (100 subsets of 1,000), and the std is its ``std(unbiased=False)``: the spread of
    the subset estimates, not the standard error of their mean. Unlike FID, the estimate is unbiased at any n,
    so KIDs of sets of different sizes compare. Deterministic for a ``seed``."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2:
        raise UserError(f"KID needs features as 2-D [n, dims] arrays, got shapes {f1.shape} and {f2.shape}")
    if f1.shape[1] != f2.shape[1]:
        raise UserError(f"KID of features of different dimensions: {f1.shape} and {f2.shape}")
    if not (np.isfinite(f1).all() and np.isfinite(f2).all()):  # as frechet_distance: NaN is no distance
        raise UserError("KID of features that are not finite (NaN or inf): they are no Inception's features")
    if f1.shape[1] == 0:
        raise UserError("KID of features with no dimensions")
    if max(np.abs(f1).max(initial=0), np.abs(f2).max(initial=0)) > 1e50:  # cubed sums of products overflow float64
        raise UserError("KID of features too large to compute in float64: they are no Inception's features")
    scores = np.array([polynomial_mmd(f1[i], f2[j])
                       for i, j in kid_subsets(len(f1), len(f2), subsets=subsets, subset_size=subset_size, seed=seed)])
    return float(scores.mean()), float(scores.std())


class FeatureStats:
    """Streaming mean and covariance of feature rows (float64 sums: memory does not grow with n), and a uniform
    random sample of at most ``capacity`` of the rows themselves (float32) for KID.

    The sample is Vitter's Algorithm R: row ``i`` (0-based) replaces a random kept row with probability
    ``capacity / (i + 1)``, so every row is kept with the same probability whatever n turns out to be. Each row past
    the capacity takes exactly one ``random()`` from a Generator seeded with ``seed``: the sample depends on the
    rows and the seed only, not on how they were split into batches."""

    def __init__(self, dims: int, capacity: int = RESERVOIR, seed: int = 0):
        self.n, self.s1, self.s2 = 0, np.zeros(dims), np.zeros((dims, dims))
        self.capacity, self._rng, self._rows = capacity, np.random.default_rng(seed), None

    def add(self, feats: np.ndarray) -> None:
        feats = feats.astype(np.float64)
        self._keep(feats)
        self.n += len(feats)
        self.s1 += feats.sum(0)
        self.s2 += feats.T @ feats

    def _keep(self, feats: np.ndarray) -> None:
        if self._rows is None:  # allocated once: growing by copies would double the peak
            self._rows = np.empty((self.capacity, feats.shape[1]), np.float32)
        free = max(0, min(len(feats), self.capacity - self.n))
        self._rows[self.n: self.n + free] = feats[:free]
        index = np.arange(self.n + free, self.n + len(feats))  # global indices of the rows past the capacity
        if len(index):
            slot = (self._rng.random(len(index)) * (index + 1)).astype(np.int64)  # uniform in 0..i
            hit = slot < self.capacity
            slot, rows = slot[hit], feats[free:][hit]
            # Sequential semantics within a batch: of rows landing in the same slot, the last one stays.
            _, last = np.unique(slot[::-1], return_index=True)
            keep = len(slot) - 1 - last
            self._rows[slot[keep]] = rows[keep]

    @property
    def rows(self) -> np.ndarray:
        """The kept feature rows: all of them while ``n <= capacity``, else a uniform sample of ``capacity`` (a view:
        no copy of up to 80 MB; later ``add`` calls change it)."""
        if self._rows is None:
            return np.empty((0, len(self.s1)), np.float32)
        return self._rows[: min(self.n, self.capacity)]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise UserError(f"FID needs at least 2 images, got {self.n}")
        mu = self.s1 / self.n
        return mu, (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1)


def weights_id(weights: str | Path | None) -> str:
    """What the statistics cache keys on for the Inception weights: a hash of the weights file's bytes (a path as
    typed would reuse statistics of other weights found at the same relative or replaced path)."""
    if isinstance(weights, str) and weights == "random":  # the string only, as inception() reads it; a file named
        return "random"                                  # random (a Path from the CLI) is hashed like any other
    path = _weights_path(weights) or _hub_file(FID_WEIGHTS_URL)
    if not path.is_file():  # pytorch-fid's own download, not made yet
        return "pytorch-fid"
    st = path.stat()
    return _file_hash(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _weights_path(path: str | Path | None) -> Path | None:
    path = path or os.environ.get(WEIGHTS_ENV)
    if not path:
        return None
    if isinstance(path, str) and not path.strip():  # "Inception weights not found:  " showed nothing
        raise UserError(f"{WEIGHTS_ENV} is blank: unset it, or set it to the weights file")
    path = user_path(path)  # $BDM_INCEPTION_WEIGHTS may start with ~ (a Path option comes back as it is)
    if not path.is_file():
        raise UserError(f"Inception weights {path} is not a regular file (a folder, pipe or device)" if path.exists()
                        else f"Inception weights not found: {path}")
    return path


def _hub_file(url: str) -> Path:
    """Where pytorch-fid keeps its downloaded weights: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _hub_weights(url: str) -> Path:
    """pytorch-fid's weights where it keeps them, downloaded there once if missing, as pytorch-fid does; but quietly,
    and a failed download (offline) leaves no folder behind and says what to do."""
    dest = _hub_file(url)
    if dest.is_file():
        return dest
    made = first_missing(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(dest), progress=False)  # a temp file, renamed when complete
    except (OSError, ValueError, RuntimeError) as e:  # urllib's errors are OSErrors
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise UserError(
            f"the FID Inception weights are not in {dest} and could not be downloaded ({type(e).__name__}): pass "
            f"--inception-weights PATH or set {WEIGHTS_ENV}=PATH (a pt_inception-2015-12-05 state dict), or put the "
            "file there") from None
    return dest


def check_dims(dims: int) -> None:
    """``--dims``: one of the Inception's pool blocks."""
    if dims not in DIMS:
        raise UsageError(f"--dims must be one of {', '.join(map(str, DIMS))}, got {dims}")


def inception(dims: int = 2048, weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """pytorch-fid's FID InceptionV3 returning pool features of ``dims``; weights from ``weights``,
    ``$BDM_INCEPTION_WEIGHTS``, or pytorch-fid's own download into the torch hub cache (``weights="random"``: seeded
    random weights, for timings only)."""
    import pytorch_fid.inception as pfi

    check_dims(dims)
    if weights == "random":
        return _random_inception(dims).to(device).eval().to(memory_format=torch.channels_last)
    path = _weights_path(weights) or _hub_weights(FID_WEIGHTS_URL)
    original = pfi.load_state_dict_from_url
    # pytorch-fid fetches its state dict through this one function; hand it the local file instead.
    pfi.load_state_dict_from_url = lambda *a, **k: torch.load(path, map_location="cpu", weights_only=True)
    try:
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
        # a file that is no state dict: a RuntimeError, KeyError (a text file: torch reads its first byte as a pickle
        # opcode) or TypeError (a list, a tensor)
        raise UserError(f"cannot load Inception weights from {path}: not a pt_inception-2015-12-05 state dict "
                        f"({type(e).__name__})") from None
    finally:
        pfi.load_state_dict_from_url = original
    broken = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken:  # its features would be NaN, and NaN statistics written or cached
        raise UserError(f"the Inception weights{f' in {path}' if path else ''} are not finite (NaN or inf in {broken!r}): "
                        "a damaged file")
    # channels_last: 1.55x faster on CPU (oneDNN), features equal to 6e-6, FID unchanged to 1e-3.
    return model.to(device).eval().to(memory_format=torch.channels_last)


def _random_inception(dims: int) -> torch.nn.Module:
    """The same architecture with seeded random weights, for timings and device checks where the real weights are not
    at hand (GPU machines get no 91 MB file): its FIDs mean nothing. pytorch-fid always loads a state dict into
    torchvision's Inception3, so that one load is skipped."""
    import pytorch_fid.inception as pfi
    from torchvision.models.inception import Inception3

    original = pfi.load_state_dict_from_url, Inception3.load_state_dict
    pfi.load_state_dict_from_url, Inception3.load_state_dict = (lambda *a, **k: {}), (lambda self, *a, **k: None)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):  # He init keeps the activations' scale through 94 convolutions
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            return model
    finally:
        pfi.load_state_dict_from_url, Inception3.load_state_dict = original


# -- image sources ----------------------------------------------------------------------------

class ImageSource(torch.utils.data.Dataset):
    """Images of a folder (recursive) or zip as float [3, H, W] in [0, 1], exactly as pytorch-fid reads them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.names = image_names(self.path, "")
        self._zip, self._pid = None, None

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        """The image in [0, 1], or None (with a warning) if it cannot be decoded."""
        from PIL import Image

        name = self.names[i]
        try:
            if self.path.is_dir():
                fp = open(self.path / name, "rb")
            else:
                if self._zip is None or self._pid != os.getpid():  # never share a handle with a forked worker
                    self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
                fp = io.BytesIO(read_member(self._zip, name))
            # As pytorch-fid reads 8-bit images (no EXIF orientation, so that both give the same FID), with the size
            # limit; 16-bit, float and transparent ones as training reads them (pytorch-fid's convert("RGB") clips
            # 16-bit to white and turns transparency black: a reference unlike the data the model saw)
            with fp, open_image(fp, name) as img:
                arr = np.asarray(to_8bit(img).convert("RGB"))
        except (*READ_ERRORS, Image.DecompressionBombError, DataError) as e:
            warnings.warn(f"skipping unreadable image {shown(name)} in {shown(self.path)} ({why_unreadable(e)})",
                          stacklevel=1)
            return None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}

    def content_key(self) -> str:
        """A hash of the images' bytes (a zip: the whole file's, since the CRCs in its directory stay the same when a
        member's data is damaged or repaired), for the statistics cache."""
        h = hashlib.sha256()
        if self.path.is_dir():
            for name in self.names:
                h.update(name.encode("utf-8", "surrogateescape") + b"\0" + _file_key(self.path / name))
        else:
            h.update("\0".join(self.names).encode("utf-8", "surrogateescape") + b"\0" + _file_key(self.path, limit=1 << 40))
        return h.hexdigest()


def _same_content(ds: ImageSource, key: str) -> bool:
    """The images still hash to ``key`` (a file removed meanwhile: they do not)."""
    try:
        return ds.content_key() == key
    except OSError:
        return False


def _file_key(path: Path, limit: int = 256 << 20) -> bytes:
    """A file's part of the cache key: its bytes' hash, streamed (memory stays flat); an image over 256 MB, which is
    no image of a FID set, by its size and time instead of hours of reading."""
    try:
        st = path.stat()
        if st.st_size > limit:
            return f"{st.st_size}:{st.st_mtime_ns}".encode()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.digest()
    except OSError:  # unreadable: skipped (and counted) when the features are computed
        return b"\0unreadable"


def _collate(batch: list[torch.Tensor | None]) -> torch.Tensor:
    """Stack (unreadable images left out); images of mixed sizes are first resized to 299 as the network
    would resize each one."""
    batch = [x for x in batch if x is not None]
    if not batch:
        return torch.empty(0, 3, 299, 299)
    if len({tuple(x.shape) for x in batch}) == 1:
        return torch.stack(batch)
    import torch.nn.functional as F

    return torch.cat([F.interpolate(x[None], size=(299, 299), mode="bilinear", align_corners=False) for x in batch])


def _cifar10_tensor(split: str) -> torch.Tensor:
    local = "give a local copy as the input instead: a folder or zip of its images, e.g. ../shared/data/cifar10-jpeg.zip"
    return torch.from_numpy(cifar10_uint8(split, local_copy=local)).permute(0, 3, 1, 2).float() / 255.0


def as_inception_input(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images to what pytorch-fid feeds the Inception: quantised as a PNG holds them, in [0, 1],
    grayscale repeated to RGB (as PIL's ``convert("RGB")`` does)."""
    from .io import to_uint8

    if not bool(torch.isfinite(x).all()):  # to_uint8 would make NaN black: a diverged model's samples scored as images
        raise ValueError("the images are not finite (NaN or inf): they cannot be scored")
    q = to_uint8(x).float() / 255.0
    return q.expand(-1, 3, -1, -1) if q.shape[1] == 1 else q


def _digits_uint8(size: int = 16) -> torch.Tensor:
    """The bundled digits as the ``digits`` preset trains on them (16x16, or a run's own size), quantised to uint8,
    as RGB."""
    from .data import load_digits

    return as_inception_input(load_digits(size, 1))


@torch.inference_mode()
def features(model: torch.nn.Module, batches: Iterable[torch.Tensor], dims: int, device,
             progress: Callable[[int], None] | None = None) -> FeatureStats:
    """Stream batches of [B, 3, H, W] images in [0, 1] through the Inception into :class:`FeatureStats`
    (mean and covariance for FID, the reservoir of rows for KID)."""
    stats = FeatureStats(dims)
    # TF32 convolutions (cuDNN's default on Ampere and later) move pool features by ~1e-3; FID on a GPU should
    # equal the CPU's, so the Inception runs in full float32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for x in batches:
            _add_features(model, x, device, stats, progress)
    return stats


def _add_features(model, x: torch.Tensor, device, stats: FeatureStats, progress) -> None:
    import torch.nn.functional as F

    if len(x) == 0:
        return
    pred = model(x.to(device).contiguous(memory_format=torch.channels_last))[0]
    if pred.shape[-1] != 1:
        pred = F.adaptive_avg_pool2d(pred, (1, 1))
    stats.add(pred.flatten(1).double().cpu().numpy())
    if progress:
        progress(len(x))


def _loader(ds, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate))


def cache_dir() -> Path:
    return user_path(os.environ.get("BDM_CACHE_DIR") or cache_home()) / "fid"  # empty: unset; ~ as a shell would


def stats_of(source: str, model, *, dims: int, device, batch_size: int = 200, workers: int | None = None,
             weights_id: str = "", use_cache: bool = True, progress=None, on_count=None,
             digits_size: int = 16) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """``(mu, sigma, n, feats)`` of a folder, zip, ``.npz`` (``mu``, ``sigma``, optionally ``n`` and ``feats``) or
    named reference (``cifar10-train``, ``cifar10-test`` through torchvision, ``digits`` as the digits preset sees
    them; ``digits_size``: their size, 16 as in the digits preset, a run's own when its samples are scored).
    ``feats`` are the kept feature rows for KID (:attr:`FeatureStats.rows`), or None for a ``.npz`` without
    them (pytorch-fid's, or one written before KID). Dataset statistics are cached under ``$BDM_CACHE_DIR/fid``
    keyed by the images' content, the dims and the weights."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    path = Path(source)
    if source in NAMED_REFS:
        images = _digits_uint8(digits_size) if source == "digits" else _cifar10_tensor(source.split("-")[1])
        name = f"digits-{digits_size}" if source == "digits" and digits_size != 16 else source  # 16: the old key
        key = hashlib.sha256(f"{name}:{dims}:{weights_id}".encode()).hexdigest()
        batches = lambda: iter(images.split(batch_size))  # noqa: E731
        count = len(images)
    elif path.suffix.lower() == ".npz" and path.is_file():
        if on_count:
            on_count(0)  # no images to read
        return read_stats(path, dims)
    elif path.exists():
        ds = ImageSource(path)
        key_of_content = ds.content_key() if use_cache else ""
        # DECODING: images of other modes (16-bit, float, transparent) are read as training reads them since v2
        key = hashlib.sha256(f"{key_of_content}:{dims}:{weights_id}:{DECODING}".encode()).hexdigest() if use_cache else ""
        batches = lambda: _loader(ds, batch_size, workers)  # noqa: E731
        count = len(ds)
    else:
        raise UserError(f"not found: {source} (a folder or zip of images, a .npz, or one of {', '.join(NAMED_REFS)})")
    if on_count:
        on_count(count)
    cached = cache_dir() / f"{key}.npz"
    if use_cache and cached.is_file():
        try:
            mu, sigma, n, feats = read_stats(cached, dims)
        except UserError as e:  # a damaged cache entry is recomputed (and rewritten), never fatal
            warnings.warn(f"ignoring a damaged FID cache entry, computing it again: {e}", stacklevel=1)
            feats = None
        if feats is not None:  # a cache entry written before KID has no features: compute it again
            if progress:
                progress(count)
            return mu, sigma, n, feats
    mu, sigma = (st := features(model, batches(), dims, device, progress)).result()
    if st.n < 2:
        raise UserError(f"{shown(source)}: {st.n} of its {count} images could be read; FID needs at least 2")
    check_stats(mu, sigma, np.array(st.n), st.rows, dims, f"{shown(source)} gave Inception statistics that FID cannot "
                "use (are its images all the same? are the --inception-weights an Inception's?)")
    if use_cache and source not in NAMED_REFS and not _same_content(ds, key_of_content):
        use_cache = False  # the files changed while they were read: this result belongs to neither version
        warnings.warn(f"{shown(source)} changed while it was read: its statistics are not cached", stacklevel=1)
    if use_cache:
        try:  # the cache only saves time: a cache folder that cannot be written must not cost the result
            cached.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(cached.parent, older_than=3600)  # a killed writer's (up to 33 MB each); an hour: not
            save_stats(cached, mu, sigma, st.n, st.rows)  # another bdm fid's write in progress
        except (OSError, UserError) as e:
            warnings.warn(f"the FID cache {shown(cache_dir())} could not be written ({getattr(e, 'strerror', None) or e}); "
                          f"the result is not cached (BDM_CACHE_DIR sets its place, --no-cache skips it)", stacklevel=1)
    return mu, sigma, st.n, st.rows


MAX_NPZ_ARRAY = 1 << 30  # bytes: the features of 10,000 images at 2048 dims are 80 MB


def _check_npz_sizes(path: Path, what: str) -> None:
    """Each member's declared size, read from its header before anything is allocated (a 100-byte file can
    declare 70 TB)."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.endswith(".npy"):
                continue
            with z.open(name) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_2_0 if version >= (2, 0) else np.lib.format.read_array_header_1_0
                shape, _, dtype = read(f)
            size = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if size > MAX_NPZ_ARRAY:
                raise UserError(f"{what}: {name} declares {size:,} bytes (shape {shape})")


def read_stats(path: Path, dims: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """``(mu, sigma, n, feats)`` of a statistics .npz (bdm's or pytorch-fid's ``--save-stats``), checked: plain numeric
    arrays only (no pickles), ``mu`` [dims], ``sigma`` [dims, dims], finite; ``feats`` [n, dims] if present."""
    what = f"{shown(path)} is not a .npz of FID statistics for --dims {dims}"
    try:
        _check_npz_sizes(path, what)
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("mu", "sigma", "n", "feats") if k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, MemoryError, *READ_ERRORS) as e:
        raise UserError(f"{what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if arrays.get("mu") is None or arrays.get("sigma") is None:
        raise UserError(f"{what}: it has no 'mu' and 'sigma' arrays")
    return check_stats(arrays["mu"], arrays["sigma"], arrays.get("n"), arrays.get("feats"), dims, what)


def check_stats(mu: np.ndarray, sigma: np.ndarray, n: np.ndarray | None, feats: np.ndarray | None, dims: int,
                what: str) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """``(mu, sigma, n, feats)`` as :func:`read_stats` returns them, if they are statistics that an Inception could
    give for a set of distinct images; the one rule for read and computed statistics (a set of identical images, or
    absurd --inception-weights, would otherwise be scored and cached, and then refused when read back)."""
    # float64 before any check: a float16 file's values overflow a comparison with 1e6 (and numpy warns)
    mu, sigma, feats = (a.astype(np.float64) if a is not None and a.dtype.kind in "fiu" else a for a in (mu, sigma, feats))
    for name, a, shape in (("mu", mu, (dims,)), ("sigma", sigma, (dims, dims))):
        if a.dtype.kind not in "fiu" or a.shape != shape or not np.isfinite(a).all():
            raise UserError(f"{what}: {name} must be finite numbers of shape {shape}, got {a.dtype} {a.shape}")
    peak = max(np.abs(a).max(initial=0) for a in (mu, sigma, feats) if a is not None and a.dtype.kind in "fiu")
    if peak > 1e6:  # Inception features are below ~20: overflow, not statistics
        raise UserError(f"{what}: its values reach {peak:.3g}, far beyond Inception features (below about 20)")
    if (np.diagonal(sigma) < 0).any() or not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * max(1.0, np.abs(sigma).max())):
        raise UserError(f"{what}: sigma is not a covariance matrix (it must be symmetric with a non-negative diagonal)")
    if np.trace(sigma) <= 1e-8 * np.sum(mu * mu):  # two or more images' features always vary (rounding: ~1e-14)
        raise UserError(f"{what}: sigma is (nearly) zero (trace {np.trace(sigma):.3g} for a mean of squared size "
                        f"{np.sum(mu * mu):.3g}), which no set of distinct images' features gives")
    low = min(a.min(initial=0) for a in (mu, feats) if a is not None and a.dtype.kind in "fiu")
    if low < -1e-6 * (1 + peak):  # every --dims block ends in a ReLU, then average pooling
        raise UserError(f"{what}: its features go down to {low:.3g}, but Inception features are never negative "
                        "(they follow a ReLU)")
    if feats is not None and (feats.dtype.kind not in "fiu" or feats.ndim != 2 or feats.shape[1] != dims
                              or not np.isfinite(feats).all()):
        raise UserError(f"{what}: feats must be finite numbers of shape [n, {dims}], got {feats.dtype} {feats.shape}")
    if n is not None and not (n.dtype.kind in "iu" and n.size == 1 and int(n.reshape(-1)[0]) >= 2):
        raise UserError(f"{what}: n must be the number of images, a whole number >= 2, got {n.dtype} {n.reshape(-1)[:3]}")
    n = int(n.reshape(-1)[0]) if n is not None else -1
    if feats is not None and (n < 2 or len(feats) != min(n, RESERVOIR)):
        # feats are every image's features, or a reservoir sample of RESERVOIR of them (bdm always writes n with them)
        raise UserError(f"{what}: it holds {len(feats)} feature rows for n = {n if n >= 0 else 'unknown'} images (all n "
                        f"up to {RESERVOIR:,}, then {RESERVOIR:,}; n must be given with feats)")
    if feats is not None:  # FID's mean and variances are those of the feats (of all of them; a reservoir's: nearly)
        scale = 1e-3 * (1 + np.abs(feats).max())
        spread = 0 if n <= RESERVOIR else 8 * np.sqrt(np.clip(np.diag(sigma), 0, None) / len(feats))  # 8 std errors
        if not (np.all(np.abs(mu - feats.mean(0)) <= 1e-3 * np.abs(mu) + scale + spread)
                and (n > RESERVOIR or (np.allclose(np.diag(sigma), feats.var(0, ddof=1), rtol=1e-2, atol=scale)
                                       and _same_covariance(sigma, feats)))):
            raise UserError(f"{what}: its mu and sigma are not the statistics of its feats (FID and KID would score "
                            "different images): write it again with bdm fid --save-stats")
    return mu, sigma, n, feats


def _same_covariance(sigma: np.ndarray, feats: np.ndarray, probes: int = 4) -> bool:
    """Whether ``sigma`` is ``feats``' covariance off its diagonal too (a sigma cut to its diagonal changed FID and
    passed the diagonal's check), tested on a few fixed random directions: ``O(n d)``, not the ``O(n d^2)`` of
    computing the covariance again."""
    v = np.random.default_rng(0).standard_normal((sigma.shape[0], probes))
    centred = feats - feats.mean(0)
    theirs = centred.T @ (centred @ v) / (len(feats) - 1)
    return bool(np.linalg.norm(sigma @ v - theirs) <= 1e-2 * np.linalg.norm(theirs) + 1e-9)


def check_input(source: str) -> None:
    """Fail before the Inception loads if an input is neither a named reference nor an existing path (nor both)."""
    if not source:  # Path("") is the current folder: an unset shell variable would score it
        raise UsageError("an input is empty (an unset shell variable?): give a folder, zip, .npz or named reference")
    check_not_shadowed(source, NAMED_REFS)
    if source not in NAMED_REFS and not Path(source).exists():
        raise UserError(f"not found: {shown(source)} (a folder or zip of images, a .npz, or one of {', '.join(NAMED_REFS)})")
    if source not in NAMED_REFS and not (Path(source).is_dir() or Path(source).is_file()):
        raise UserError(f"{shown(source)} is neither a folder nor a regular file (a pipe or device?)")
    if Path(source).is_dir() and (Path(source) / "checkpoint.pt").is_file():  # its images are only preview grids
        raise UsageError(f"{shown(source)} is a bdm run folder: score its model with --run {shown(source)} --ref REF")
    path = Path(source)
    if source not in NAMED_REFS and path.is_file() and path.suffix.lower() != ".npz":  # images come in a zip
        if not zipfile.is_zipfile(path):
            raise UserError(f"{shown(source)} is neither a zip of images nor a .npz of statistics")
        with contextlib.suppress(*READ_ERRORS):
            with zipfile.ZipFile(path) as z:
                if {"mu.npy", "sigma.npy"} <= set(z.namelist()):  # it would be read as a zip without images
                    raise UsageError(f"{shown(source)} holds FID statistics: name it .npz")
                if any(n.endswith("/data.pkl") for n in z.namelist()):  # torch.save's format is a zip too
                    raise UsageError(f"{shown(source)} is a torch checkpoint, not images: score a model's samples with "
                                     f"--checkpoint {shown(source)} --ref REF")


def save_stats(path: Path, mu: np.ndarray, sigma: np.ndarray, n: int, feats: np.ndarray | None = None) -> Path:
    """``mu``, ``sigma`` and ``n`` as pytorch-fid reads them (``n`` < 0: unknown, as for a .npz without it: left out),
    and ``feats`` (the kept feature rows, for KID) when given; refused unless :func:`read_stats` would read them back
    (:func:`check_stats`)."""
    if Path(path).suffix.lower() != ".npz":  # what read_stats and bdm fid take as statistics
        raise UsageError(f"{shown(path)}: FID statistics are written to a .npz file")
    mu = np.asarray(mu)
    check_stats(mu, np.asarray(sigma), None if n < 0 else np.asarray(n), None if feats is None else np.asarray(feats),
                mu.shape[0] if mu.ndim else 0, f"the statistics for {shown(path)}")
    arrays = dict(mu=mu, sigma=sigma) | ({} if n < 0 else dict(n=n)) | ({} if feats is None else dict(feats=feats))
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return Path(path)

"""What training and sampling share: the device, bf16, compilation, weight loading and the denoiser the engine sees.

``bdm train`` (train.py) and ``bdm sample`` / ``bdm fid --run`` (generate.py) both import from here, so the two
paths cannot drift apart (a checkpoint trained on one device samples the same way on another).
"""

from __future__ import annotations

import hashlib

import torch

from .config import DEVICES, Config
from .engine import precondition
from .errors import UsageError, UserError

__all__ = ["resolve_device", "bf16_native", "bf16_network", "compile_enabled", "compiled", "denoiser", "denoised_range",
           "load_weights", "seed_of"]


def seed_of(*parts) -> int:
    """A 63-bit torch seed from a hash of ``parts`` (the user's seed and what the stream is for: a sample's index, a
    rank, an epoch). Distinct parts never share a stream, which an affine mix such as ``seed * 1000 + rank`` cannot
    promise (seed 1's rank 0 was seed 0's rank 1000) and which overflows for large seeds."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def resolve_device(name: str, local_rank: int = 0, *, what: str = "--device") -> torch.device:
    """``auto`` (CUDA where there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine;
    ``what`` names where the value came from in the errors (the option, or ``train.device`` of a config)."""
    if not isinstance(name, str) or not DEVICES.fullmatch(name):  # "cpu " or "CPU": as train.device, never guessed
        raise UsageError(f"{what} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"{what} {name} was asked for but CUDA is not available on this machine (use cpu or auto)")
        index = name.partition(":")[2]
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise UserError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 .. "
                            f"cuda:{torch.cuda.device_count() - 1}")
        return torch.device(name if index else f"cuda:{local_rank}")
    if name.startswith("mps"):
        if not torch.backends.mps.is_available():
            raise UserError(f"{what} mps was asked for but Apple's MPS is not available on this machine (use cpu or auto)")
        return torch.device("mps")
    return torch.device("cpu")


def denoised_range(stats: dict | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The data's per-frequency range that bounds the samplers' x prediction (engine ``sample(denoised_range=)``);
    None for checkpoints written before the range was stored."""
    if not stats or "min_u" not in stats:
        return None
    return stats["min_u"], stats["max_u"]


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX-512/AMX bf16 through oneDNN. Elsewhere
    bf16 is emulated and slower than float32, so autocast stays off."""
    return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_network(net, device: torch.device, enabled: bool):
    """``net`` under bf16 autocast when enabled and ``device`` does bf16 natively: bf16 only inside the network,
    the DCT and the loss stay in float32. On a 2-core AVX-512 BF16 CPU it trains cifar10_cpu 2.0x faster and
    digits 1.5x (bench/, docs/benchmarks.md); very small nets (the tiny preset) are slower, so it turns it off."""
    if not (enabled and bf16_native(device)):
        return net

    def network(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return net(z, t)

    return network


def denoiser(net, cfg: Config, stats: dict | None):
    """The eps predictor the engine trains and samples: the network, preconditioned when the config says so."""
    if not (cfg.model.precondition and stats):
        return net
    return precondition(net, cfg.diffusion, stats["mean_u"], stats["var_u"], stats.get("basis_u"))


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # weights that load into a float32 model


def load_weights(model: torch.nn.Module, state: dict, which: str = "model", use: str = "sample") -> None:
    """load_state_dict with a one-line message naming the first mismatch (another config's checkpoint); ``which``
    weights of the checkpoint (``model``: the training weights, ``ema``), loaded to ``use`` them (sample, resume)."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise UserError(f"checkpoint does not fit this model: unexpected weight {key!r} (was it trained with another config?)")
        if not isinstance(value, torch.Tensor) or value.is_meta or value.dtype != own[key].dtype and not (
                value.dtype in _FLOATS and own[key].dtype in _FLOATS):
            raise UserError(f"checkpoint does not fit this model: {key} is "
                            f"{'a meta tensor (no data)' if isinstance(value, torch.Tensor) and value.is_meta else getattr(value, 'dtype', type(value).__name__)}, "
                            f"where the model has {own[key].dtype} (a checkpoint from elsewhere?)")
        if own[key].shape != value.shape:
            raise UserError(f"checkpoint does not fit this model: {key} has shape {tuple(value.shape)} in the checkpoint, "
                            f"{tuple(own[key].shape)} in the model (was it trained with another config?)")
    missing = [k for k in own if k not in state]
    if missing:
        raise UserError(f"checkpoint does not fit this model: weight {missing[0]!r} is missing (another config?)")
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        kind = "training weights ('model')" if which == "model" else f"{which!r} weights"
        raise UserError(f"the checkpoint's {kind} are not finite (NaN or inf in {broken[0]!r}): it cannot {use} from them"
                        + (" (sampling uses the EMA weights, unless --no-ema)" if which == "model" and use == "resume" else ""))
    model.load_state_dict(state)


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``train.compile`` / ``bdm sample --compile``: "true", "false", or "auto" (on CUDA only: compiling the
    cifar10_cpu UNet took over 6 minutes on a 2-core CPU, more than it saves in a CPU session)."""
    setting = str(setting).lower()
    return device.type == "cuda" if setting == "auto" else setting == "true"


def compiled(net, setting: str, device: torch.device, cuda_graphs: bool = False):
    """``torch.compile(net)`` where :func:`compile_enabled` says so, else ``net``. Only the network is compiled: the
    engine's DCT and schedule around it are a few small matrix products. ``cuda_graphs`` (CUDA only): replay the
    compiled forward and backward as CUDA graphs (mode "reduce-overhead"), which removes the per-kernel launch cost
    that bounds this UNet's step (H200, cifar10 preset: 5,516 img/s against 2,005 compiled without). Only for
    callers that consume each output before the next call (the training step): a replay overwrites the last one's
    outputs, so multistep samplers, which keep earlier predictions, use the plain compiled network."""
    if not compile_enabled(setting, device):
        return net
    return torch.compile(net, mode="reduce-overhead" if cuda_graphs and device.type == "cuda" else None)

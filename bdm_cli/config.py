"""One typed config: frozen dataclasses hold the defaults, YAML presets hold differences.

A preset is a YAML mapping of ``section: {key: value}`` (plus an optional ``extends:
other_preset``); unknown sections or keys are errors with the nearest valid name, values
are checked against the field's type, and ``--set section.key=value`` overrides any field.
YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError
from .paths import user_path
from .engine import GRIDS, SAMPLERS, BlurSchedule

__all__ = ["Config", "ConfigError", "DEVICES", "MAX_WORKERS", "load_config", "list_presets", "preset_path", "apply_overrides", "to_dict", "from_dict", "load_yaml"]


MAX_WORKERS = 64  # data loader processes: data.num_workers, and bdm fid --workers

class ConfigError(UsageError):
    """A user-facing configuration problem (bad preset, key, value or YAML)."""


@dataclass(frozen=True)
class ModelConfig:
    """The UNet (DDPM/ADM style); it maps (z_t, t) -> eps and knows nothing of diffusion."""

    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_heads: int = 1
    # eps_hat = (exact eps of a Gaussian with the data's per-frequency mean/variance) + network:
    # see engine.precondition. false: the paper's bare eps network.
    precondition: bool = True


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | digits | a folder of images | a zip of images
    split: str = "train"  # the sub-folder of a folder/zip to use ("" for all)
    resolution: int = 32
    channels: int = 3
    hflip: bool = True
    num_workers: int = 2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 100
    sample_every: int = 10_000
    checkpoint_every: int = 10_000
    device: str = "auto"
    bf16: bool = True  # bf16 autocast in the network on CUDA and on CPUs with native bf16 (AVX-512 BF16, AMX)
    skip_nonfinite: bool = False  # skip (and count) batches whose loss is NaN/inf instead of stopping
    compile: typing.Literal["auto", "true", "false"] = "auto"  # torch.compile the network (CUDA graphs on one GPU): true | false | auto (CUDA only; minutes on a CPU)


@dataclass(frozen=True)
class SampleConfig:
    # unipc at 20 steps (21 network calls): on the converged digits model the lowest FID and KID at 20 calls, 1.02x the
    # FID of the paper's 1,000 ancestral steps, and samples like the data; 50 calls tie for 2.5x the time (README
    # "Samplers and time grids", docs/benchmarks.md item 9). The paper presets keep ancestral at 1,000 steps.
    steps: int = 20
    sampler: str = "unipc"
    grid: str = ""  # empty: the sampler's default (uniform for ancestral, spectral otherwise)
    preview_steps: int = 20  # steps for the sample grids written during training
    n: int = 64
    batch_size: int = 256


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: BlurSchedule = field(default_factory=BlurSchedule)  # the schedule itself (Sec. 3-4); 0 blur = DDPM
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    preset: str = ""  # the preset this config came from (informational)

    def validate(self) -> "Config":
        """Check cross-field constraints; raises ConfigError."""
        levels = len(self.model.channel_mult)
        if not 1 <= levels <= 8:  # first: the checks below compute 2^(levels - 1)
            raise ConfigError(f"model.channel_mult must have 1 to 8 levels, got {levels}")
        checks = [
            (all(r >= 1 for r in self.model.attn_resolutions),
             f"model.attn_resolutions must be feature map sizes (px) >= 1, got {list(self.model.attn_resolutions)}"),
            (self.sample.sampler in SAMPLERS, f"sample.sampler must be one of {', '.join(SAMPLERS)}, got "
                                              f"{self.sample.sampler!r}"),
            (self.sample.grid in ("",) + GRIDS, f"sample.grid must be empty or one of {', '.join(GRIDS)}, got "
                                                f"{self.sample.grid!r}"),
            (self.data.resolution >= 4, "data.resolution must be >= 4"),
            (self.data.channels in (1, 3), "data.channels must be 1 or 3"),
            (self.model.channels > 0 and len(self.model.channel_mult) > 0, "model.channels and model.channel_mult must be positive"),
            (self.data.resolution % 2 ** (len(self.model.channel_mult) - 1) == 0,
             f"data.resolution {self.data.resolution} must be divisible by 2^(len(model.channel_mult)-1) = "
             f"{2 ** (len(self.model.channel_mult) - 1)}"),
            (self.train.steps >= 0, f"train.steps must be >= 0, got {self.train.steps}"),
            (self.train.batch_size > 0, f"train.batch_size must be > 0, got {self.train.batch_size}"),
            # Adam moves each weight by about lr a step and AdamW shrinks it by lr x weight_decay: beyond 1 the weights
            # leave every finite range within a step (the run "succeeded" with inf weights)
            (0 < self.train.lr <= 1, f"train.lr must be in (0, 1], got {self.train.lr:g}"),
            (self.train.warmup >= 0 and self.train.grad_clip >= 0, "train.warmup and train.grad_clip must be >= 0"),
            (0 <= self.train.weight_decay <= 1, f"train.weight_decay must be in [0, 1], got {self.train.weight_decay:g}"),
            (0 <= self.train.ema_decay < 1, f"train.ema_decay must be in [0, 1) (1 would keep the initial weights), "
                                            f"got {self.train.ema_decay:g}"),
            (0 <= self.train.seed < 2**63, "train.seed must be in 0 .. 2^63-1"),
            (min(self.train.log_every, self.train.sample_every, self.train.checkpoint_every) >= 0,
             "train.log_every, train.sample_every and train.checkpoint_every must be >= 0 (0: never)"),
            (DEVICES.fullmatch(self.train.device) is not None, f"train.device must be auto, cpu, cuda, cuda:N or mps, "
                                                               f"got {self.train.device!r}"),
            (0 <= self.model.dropout < 1, f"model.dropout must be in [0, 1), got {self.model.dropout:g}"),
            (self.model.num_heads >= 1 and self.model.num_res_blocks >= 1 and min(self.model.channel_mult, default=0) >= 1,
             "model.num_heads, model.num_res_blocks and every model.channel_mult must be >= 1"),
            # far above any published UNet (ADM: 256 channels, 3 blocks, x4): beyond, building the model alone takes
            # minutes to end out of memory
            (self.model.channels <= 4096 and self.model.num_res_blocks <= 64 and max(self.model.channel_mult) <= 64,
             f"model.channels must be <= 4096, model.num_res_blocks <= 64 and every model.channel_mult <= 64, got "
             f"{self.model.channels}, {self.model.num_res_blocks} and {list(self.model.channel_mult)}"),
            (self.model.num_heads < 1 or all(self.model.channels * m % self.model.num_heads == 0 for m in self.model.channel_mult),
             f"model.num_heads={self.model.num_heads} must divide every level's width (model.channels x channel_mult)"),
            (0 <= self.data.num_workers <= MAX_WORKERS,
             f"data.num_workers must be in 0..{MAX_WORKERS}, got {self.data.num_workers}"),
            (self.data.resolution <= MAX_RESOLUTION, f"data.resolution must be <= {MAX_RESOLUTION}, got {self.data.resolution}"),
            (0 < self.sample.n <= 1024 and self.sample.batch_size > 0,
             f"sample.n (the training grids' samples, drawn in one batch) must be in 1..1024 and sample.batch_size > 0, "
             f"got {self.sample.n} and {self.sample.batch_size}"),
            (math.isfinite(self.diffusion.sigma_blur_max), "diffusion.sigma_blur_max must be finite"),
            (1 <= self.sample.steps <= 4000, f"sample.steps must be in 1..4000, got {self.sample.steps}"),
            (1 <= self.sample.preview_steps <= 4000, f"sample.preview_steps must be in 1..4000, got {self.sample.preview_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


MAX_RESOLUTION = 1024  # LSUN-scale images and beyond; larger would not fit a UNet in memory anyway
DEVICES = re.compile(r"auto|cpu(:0)?|cuda(:[0-9]+)?|mps(:0)?")  # as torch spells them (ASCII digits: \d takes any script's)


# -- presets ----------------------------------------------------------------------

def _presets_dir() -> Path:
    """Presets ship inside the wheel as ``bdm_cli/presets``; in a source checkout they are ``presets/``."""
    packaged = resources.files("bdm_cli") / "presets"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "presets"


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description (the first comment line of the YAML)."""
    out = {}
    for p in sorted(_presets_dir().glob("*.yaml")):
        first = p.read_text().splitlines()[0] if p.stat().st_size else ""
        out[p.stem] = first.lstrip("# ").strip() if first.startswith("#") else ""
    return out


def preset_path(name: str) -> Path:
    """A built-in preset's name, or a user's own preset file: a name ending in .yaml/.yml or holding a folder part."""
    path = user_path(name)  # --preset=~/p.yaml reaches bdm unexpanded
    if path.suffix.lower() in (".yaml", ".yml") or os.sep in name or (os.altsep and os.altsep in name):
        if path.is_file():
            if path.suffix.lower() not in (".yaml", ".yml"):
                raise ConfigError(f"preset file {name} must end in .yaml or .yml")
            if not path.stem.strip("."):  # "...yaml": the run folder runs/<name> would be runs/.. or runs/.
                raise ConfigError(f"preset file {name} has no name before its extension (runs are named after it): "
                                  "rename it")
            return path
        if path.exists():
            raise ConfigError(f"preset {name} is not a regular file (a folder, pipe or device)")
        raise ConfigError(f"preset file not found: {name}")
    names = list_presets()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(
            f"unknown preset {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; choose from {', '.join(names)}"
        )
    return _presets_dir() / f"{name}.yaml"


class _PresetLoader(yaml.SafeLoader):
    """safe_load without aliases: a preset never needs them, and nested aliases ("billion laughs") expand a
    700-byte file into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed in presets (line {mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is an error: YAML's last-one-wins would silently drop a whole section."""
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(None, None, "merge keys (<<) are not supported in presets: write "
                                                        "the keys out, or start from another preset with extends:",
                                                        key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):  # [a, b] or {a: 1} as a key: unhashable, and no config name
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain name, not a list or mapping",
                                                        key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_int(loader: yaml.SafeLoader, node) -> int | str:
    """Integers as YAML 1.2 reads them: ``010`` is ten (YAML 1.1: eight), ``1:30`` stays text (YAML 1.1: base 60,
    ninety), so the field's type check names it; ``0x``/``0o``/``0b`` prefixes as written."""
    raw = loader.construct_scalar(node)
    text = raw.replace("_", "")
    if ":" in text:
        return raw
    digits = text.lstrip("+-")
    if len(digits) > 64:  # Python refuses to parse over 4300 digits; no field needs more than 19
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(digits)} digits", node.start_mark)
    value = int(digits, 0) if digits[:2].lower() in ("0x", "0o", "0b") else int(digits, 10)
    return -value if text.startswith("-") else value


def _yaml_float(loader: yaml.SafeLoader, node) -> float | str:
    raw = loader.construct_scalar(node)
    return raw if ":" in raw else loader.construct_yaml_float(node)  # "1:30.5": YAML 1.1 base 60, kept as text


_PresetLoader.add_constructor("tag:yaml.org,2002:int", _yaml_int)
_PresetLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0o[0-7_]+$"), list("-+0"))  # YAML 1.2
_PresetLoader.add_constructor("tag:yaml.org,2002:float", _yaml_float)


def load_yaml(text: str):
    """One YAML document through :class:`_PresetLoader` (presets, ``--set`` values and a run's config.yaml read
    alike: ``010`` is ten, never YAML 1.1's octal eight)."""
    loader = _PresetLoader(text)  # a SafeLoader: only plain YAML types are built
    try:
        return loader.get_single_data()
    except (ValueError, KeyError, TypeError, OverflowError) as e:  # a value its tag cannot build: 2023-02-29, !!int x
        raise yaml.YAMLError(f"a value YAML cannot read ({type(e).__name__}: {e})") from None
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (a preset is YAML text)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a preset") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {getattr(e, 'problem', e)}") from None
    if data is None:  # an empty (or truncated) file would train the defaults under its name without a word
        raise ConfigError(f"{path}: the preset is empty (no settings); write the settings that differ from the "
                          "defaults, or {} to train the defaults themselves")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections, got {type(data).__name__}")
    return data


def _coerce(value: Any, typ: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the dataclass field's type, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:  # a choice of words; YAML's true/false are the words "true"/"false" here
        text = str(value).lower() if isinstance(value, (str, bool)) else None
        if text not in typing.get_args(typ):
            raise ConfigError(f"{name} must be one of {', '.join(typing.get_args(typ))}, got {reprlib.repr(value)}")
        return text
    if origin is tuple:
        if isinstance(value, str):  # "1,2" or "(1, 2)" as typed; one pair of brackets at most, so "[1][2]" is no 12
            inner = re.fullmatch(r"\s*(?:\[([^][()]*)\]|\(([^][()]*)\)|([^][()]*))\s*", value)
            items = next(g for g in inner.groups() if g is not None).split(",") if inner else [""]
            if len(items) > 1 and not items[-1].strip() and items[-2].strip():  # Python's "(16,)"; "," stays bad
                items = items[:-1]
            if inner is None or (len(items) > 1 and not all(v.strip() for v in items)):
                raise ConfigError(f"{name} must be a list such as [1, 2], got {reprlib.repr(value)}")
            value = [v for v in items if v.strip()]
        if isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {reprlib.repr(value)}")  # bounded: a mapping 10^5 deep
        return tuple(_coerce(v, typing.get_args(typ)[0], name) for v in value)
    try:
        if typ is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):  # YAML's words
                return value.lower() in ("true", "yes", "on")
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ in (int, float) and isinstance(value, str) and not value.isascii():
            raise ValueError  # int("١٢") is 12: digits of other scripts are no typo bdm should read
        if typ is int:
            if isinstance(value, float) and value.is_integer() and abs(value) >= 2**53:
                raise ConfigError(f"{name}: {value:.0f} was read as a decimal number, rounded past 2^53: write it "
                                  "without a decimal point or exponent")
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
            if not -(2**63) <= value < 2**63:  # torch seeds and counters are 64-bit
                raise ValueError
            return value
        if typ is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value) + 0.0  # -0 is 0
        if typ is str:
            if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):  # a library caller's Path
                return os.fspath(value)
            if not isinstance(value, (str, int, float, bool, list, dict, datetime.date, type(None))):  # not YAML's: Python's
                raise ConfigError(f"{name} must be text (a str), got a {type(value).__name__}")
            if not isinstance(value, str):  # YAML reads `dataset: 01` as 1 and `split: yes` as True: never retyped
                kind = "nothing" if value is None else f"the {type(value).__name__} {reprlib.repr(value)}"
                raise ConfigError(f"{name} must be text, but YAML read {kind} there: quote the value "
                                  f"({name.split('.')[-1]}: '...')")
            return value
    except (TypeError, ValueError, OverflowError):
        what = {float: "a finite number", int: "a whole number (64-bit)", bool: "true or false"}.get(typ, typ.__name__)
        shown = reprlib.repr(value)  # bounded, however large the value
        raise ConfigError(f"{name} must be {what}, got {shown}") from None
    raise ConfigError(f"{name}: unsupported type {typ}")  # pragma: no cover - a dataclass bug


def _merge(cfg: Config, data: dict, source: str) -> Config:
    sections = {f.name: f for f in fields(Config) if f.name != "preset"}
    for section, values in data.items():
        if section not in sections:
            hint = difflib.get_close_matches(str(section), sections, n=1)
            raise ConfigError(f"{source}: unknown section {reprlib.repr(section)}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {reprlib.repr(section)} must be a mapping of keys")
        current = getattr(cfg, section)
        types_ = typing.get_type_hints(type(current))
        changes = {}
        for key, value in values.items():
            if key not in types_:
                hint = difflib.get_close_matches(str(key), types_, n=1)
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}" + (f" (did you mean {section}.{hint[0]}?)" if hint else "")
                )
            changes[key] = _coerce(value, types_[key], f"{section}.{key}")
        try:
            cfg = replace(cfg, **{section: replace(current, **changes)})
        except ValueError as e:  # a dataclass's own checks (BlurSchedule validates itself)
            raise ConfigError(f"{source}: {section}.{e}") from None  # its messages start with the field's name
    return cfg


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the preset (and what it ``extends``), then ``section.key=value`` overrides; the whole checked
    once, at the end (a base preset may hold values that only its child makes valid)."""
    if preset is not None and not isinstance(preset, (str, os.PathLike)):
        raise TypeError(f"preset must be a preset's name or a .yaml path, got {type(preset).__name__}")
    preset = os.fspath(preset) if isinstance(preset, os.PathLike) else preset
    return apply_overrides(_preset_config(preset) if preset else Config(), overrides).validate()


def _preset_config(preset: str, _seen: tuple = ()) -> Config:
    """The defaults under a preset and the chain it ``extends``, each field checked, the whole not yet."""
    path = preset_path(preset)
    shown = path.name if path.parent == _presets_dir() else str(path)  # a user's file as its path: which p.yaml?
    key = str(path.resolve())  # resolved: sub/../sub/a.yaml is the same file as sub/a.yaml
    if key in _seen:
        raise ConfigError(f"{_seen[0]}: preset 'extends' loop through {shown!r}")
    if len(_seen) >= 16:
        raise ConfigError(f"{_seen[0]}: preset 'extends' chain longer than 16 files")
    data = _read_yaml(path)
    has_parent, parent = "extends" in data, data.pop("extends", None)
    name = data.pop("preset", None)  # a run's config.yaml names its preset: it serves as a preset itself
    if name is not None and not isinstance(name, str):  # (to train the same model again, under that name)
        raise ConfigError(f"{shown}: 'preset' is the name of the preset a run came from, a text")
    if has_parent and (not isinstance(parent, str) or not parent):  # extends: 0 / false / "" / ~ meant something
        raise ConfigError(f"{shown}: 'extends' must name a preset or a .yaml file, got {reprlib.repr(parent)}")
    cfg = Config()
    if parent:
        if Path(parent).suffix.lower() in (".yaml", ".yml") or "/" in parent:
            # a file named by a preset is found beside that preset (or where it says: ~/ or /), never in the
            # current folder: the same preset gives the same config wherever it is run from; joined as text, so
            # that ./tiny keeps its folder part (a Path made it the built-in tiny)
            expanded = str(user_path(parent)) if parent.startswith("~") else parent
            beside = path.resolve().parent if path.is_symlink() else path.parent  # a link's file's folder, not the link's
            parent = os.path.join(str(beside), expanded)
        cfg = _preset_config(parent, _seen + (key,))
    return replace(_merge(cfg, data, shown), preset=name if name and re.fullmatch(r"\w[\w.-]*", name) else path.stem)


def _field_type(section: str, name: str):
    """The declared type of ``section.name``, or None (the merge then reports the unknown key)."""
    sections = {f.name: f for f in fields(Config) if f.name != "preset"}
    if section not in sections:
        return None
    return typing.get_type_hints(sections[section].default_factory).get(name)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``section.key=value`` strings. A string field takes the value as typed (``--data 01`` is the folder "01", not the
    number 1; ``[2024] photos`` is a name, not YAML); other fields read it as YAML (lists, numbers, booleans)."""
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):  # a string read one character at a time
        raise TypeError(f"overrides must be a list of 'section.key=value' strings, got {reprlib.repr(overrides)}")
    data: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if not isinstance(item, str):
            raise TypeError(f"overrides must be 'section.key=value' strings, got {reprlib.repr(item)}")
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects section.key=value, got {reprlib.repr(item)}")
        if name in data.get(section, {}):  # as a key twice in a preset: one would silently win
            raise ConfigError(f"--set {section}.{name} is given twice: give it once")
        if _field_type(section, name) is str:
            parsed = value
        else:
            try:
                parsed = load_yaml(value) if value.strip() else ""
            except (yaml.YAMLError, RecursionError):
                parsed = value  # the field's type check says what was wrong with it
            # Keep strings that YAML would turn into dates or other exotic types as strings.
            if not isinstance(parsed, (str, int, float, bool, list)) or parsed is None:
                parsed = value
        data.setdefault(section, {})[name] = parsed
    return _merge(cfg, data, "--set") if data else cfg


def to_dict(cfg: Config) -> dict:
    """A plain, YAML/JSON-safe dict of the whole config (tuples as lists)."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {
        f.name: ({k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()} if f.name != "preset" else cfg.preset)
        for f in fields(Config)
    }


def from_dict(data: dict) -> Config:
    """Inverse of :func:`to_dict` (used for configs stored in checkpoints and run directories)."""
    if not isinstance(data, dict):
        raise ConfigError(f"saved config must be a mapping of sections, got {reprlib.repr(data)} (a damaged or foreign "
                          "checkpoint or config.yaml)")
    data = dict(data)
    preset = data.pop("preset", "")
    if not isinstance(preset, str):
        raise ConfigError(f"saved config: preset must be text, got {reprlib.repr(preset)}")
    missing = [f.name for f in fields(Config) if f.name != "preset" and f.name not in data]
    if missing:  # bdm saves every section: defaults here would pass for what the run was trained with
        raise ConfigError(f"saved config has no {', '.join(missing)} section (a damaged or foreign checkpoint or "
                          "config.yaml)")
    return replace(_merge(Config(), data, "saved config"), preset=preset).validate()


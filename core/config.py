"""RunConfig: the one description of a run, shared by the GUI form, the CLI and TOML.

Every field has a docstring (the string literal under it); the GUI turns them into
tooltips and the CLI into `--set` help.  Nothing else in paralab parses user input:
values arrive here as text (`--set train.lr=0.01`, a TOML file, a form field), are
converted with `coerce`, and `core.validation.problems` returns every problem as a
sentence a person can act on.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

MODELS = ("linear", "split-nn", "mlp", "transformer")
DATASETS = ("auto", "regression", "constant-target", "teacher", "tokens")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("gpipe", "1f1b")
CHECKPOINTING = ("none", "blocks", "selective")
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """Bad user input; the message is a sentence meant for a person."""


MAX_SHOWN = 60
MAX_FILE_BYTES = 1 << 20
"""A config file larger than this is not a config file (/dev/zero, a log given by mistake)."""
MAX_NESTING = 32


def shown(value: Any) -> str:
    """repr(value) for a message, cut to MAX_SHOWN characters: a sentence, not the input back."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 1] + "…"


class Bytes(int):
    """A byte count that reads and writes as '24GiB', '512MiB', '1e9' or '1000000'."""

    _UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

    @classmethod
    def parse(cls, text: str | int | float) -> Bytes:
        if isinstance(text, bool):
            raise ConfigError(f"{shown(text)} is not a memory size")
        if isinstance(text, (int, float)):
            value = float(text)
        else:
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
            if not m or m.group(2).lower() not in cls._UNITS:
                raise ConfigError(f"{shown(text)} is not a memory size; write it like 24GiB, 512MiB or 1000000")
            value = float(m.group(1)) * cls._UNITS[m.group(2).lower()]
        if value != value or value < 0 or value > 2**62:
            raise ConfigError(f"{shown(text)} is not a memory size")
        return cls(int(value))

    def human(self) -> str:
        return human_bytes(int(self))

    def exact(self) -> str:
        """The largest unit that writes this size without rounding ('3000MiB', not 2.9GiB)."""
        for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if int(self) and int(self) % size == 0:
                return f"{int(self) // size}{unit}"
        return str(int(self))


def human_bytes(n: float, exact_against: float | None = None) -> str:
    """'2.9 GiB'.  With `exact_against`, as many decimals as it takes for two different
    sizes not to read the same ('7.63 MiB of its 7.65 MiB', never '7.6 MiB of its 7.6 MiB')."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            digits = 1 if value < 100 else 0
            while exact_against is not None and exact_against != n and digits < 9 and \
                    f"{value:.{digits}f}" == f"{exact_against / size:.{digits}f}":
                digits += 1
            return f"{value:.{digits}f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    kind: str = "mlp"
    """Model: 'linear' (the data-parallel seed's Linear(1,1)), 'split-nn' (the model-parallel seed's 10→50→20→1), 'mlp', or 'transformer' (a small GPT)."""
    width: int = 256
    """Hidden width of the MLP, or the transformer's model dimension."""
    depth: int = 4
    """Number of hidden blocks of the MLP, or transformer blocks."""
    heads: int = 4
    """Attention heads per transformer block; must divide width."""
    seq_len: int = 64
    """Tokens per transformer sequence."""
    vocab: int = 512
    """Transformer vocabulary size."""
    in_features: int = 32
    """Input features of the MLP."""
    out_features: int = 8
    """Outputs of the MLP."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    kind: str = "auto"
    """Synthetic data: 'regression' (y = 3x + noise, the data-parallel seed), 'constant-target' (uniform inputs, target 1, the model-parallel seed), 'teacher' (a random MLP to imitate), 'tokens' (token sequences from a random Markov chain), or 'auto' (the model's natural data)."""
    samples: int = 0
    """Samples in the data set (0: the model's default; the seeds use 10000 and 100). Batches cycle through it."""
    noise: float = 0.5
    """Standard deviation of the noise added to regression targets."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    steps: int = 200
    """Training steps (one optimizer update each; the seeds call them epochs)."""
    batch_size: int = 64
    """Global batch: samples per step over all devices."""
    lr: float = 0.01
    """Learning rate; can be changed while the run goes."""
    optimizer: str = "adam"
    """Optimizer: 'sgd', 'adam' or 'adamw'."""
    micro_batches: int = 4
    """Pipeline micro-batches per step; must divide the batch."""
    schedule: str = "gpipe"
    """Pipeline schedule: 'gpipe' (all forwards, then all backwards) or '1f1b' (one forward, one backward)."""
    log_every: int = 1
    """Emit a step event every this many steps (the loss is read back in batches, never with a sync per step)."""
    grad_accumulation: int = 1
    """Micro-steps per optimizer step: each runs forward and backward on batch/k samples and the gradients add up, so activations are one micro-step's; must divide each device's share of the batch."""
    activation_checkpointing: str = "none"
    """Activation checkpointing: 'none', 'blocks' (each block keeps only its input and runs its forward again in backward) or 'selective' (each block keeps its matmul outputs and recomputes the rest)."""
    precision: str = "fp32"
    """Compute precision: 'fp32', or 'bf16' (mixed precision: float32 master weights, gradients and optimizer state; matmuls and activations in bfloat16)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PlacementConfig:
    split: tuple[int, ...] = ()
    """Model-parallel and pipeline: how many consecutive layers each device holds, e.g. 1,2 (empty: an even split)."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (ZeRO-3); false keeps them until backward (ZeRO-2-like)."""
    zero: int = 0
    """ZeRO stage: 0 is the mode's own (ddp replicates everything; fsdp follows reshard_after_forward); 1 shards ddp's optimizer state over the devices (ZeroRedundancyOptimizer); 2 and 3 are fsdp with reshard_after_forward false and true."""
    cpu_offload: bool = False
    """FSDP: keep the parameter shards, their gradients and the optimizer state in host memory and step on the CPU (CPUOffloadPolicy); the device holds only what is gathered."""

    def reshards_after_forward(self) -> bool:
        """FSDP frees the gathered parameters after forward: placement.zero 3, not with 2, else reshard_after_forward."""
        return {2: False, 3: True}.get(self.zero, self.reshard_after_forward)


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshConfig:
    dp: int = 1
    """mode=mesh: replicas of the model (data parallel); with mesh.shard > 1 this is HSDP's replicate axis."""
    shard: int = 1
    """mode=mesh: devices each parameter, gradient and optimizer state is sharded over (FSDP)."""
    tp: int = 1
    """mode=mesh: devices each block's weight matrices are split over (tensor parallel)."""
    pp: int = 1
    """mode=mesh: pipeline stages (consecutive layers per stage; train.micro_batches flow through)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SimConfig:
    memory: Bytes = Bytes(24 * 2**30)
    """Memory capacity of each simulated device, e.g. 24GiB. Simulated devices compute on the CPU; only this capacity is made up."""
    gpu: str = "H100 SXM"
    """The GPU a simulated device keeps time as: 'H100 SXM', 'A100 80GB', 'RTX 4090', 'L4' (resources/gpus.toml) or 'host' for the CPU's measured time."""
    tf32: bool = False
    """Modelled float32 matmuls run on tensor cores (TF32), as with torch.backends.cuda.matmul.allow_tf32; torch's default is off."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TelemetryConfig:
    interval_s: float = 0.25
    """Seconds between memory, span and utilization samples (default 4 Hz)."""
    hang_timeout_s: float = 30.0
    """A rank that makes no progress for this long is declared hung and the run is ended."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    mode: str = "single"
    """Parallelism mode: single, data-parallel, model-parallel, ddp, pipeline, fsdp, tensor-parallel, or mesh (the mesh.* degrees composed)."""
    devices: str = "auto"
    """Devices: 'auto' (every GPU, or sim:2 without one), 'sim:N' (N simulated devices), 'cuda:0,1' (those GPUs), 'cuda:0xN' (N logical devices sharing GPU 0)."""
    seed: int = 0
    """Random seed for the model, the data and everything else."""
    name: str = ""
    """A title for the run (presets set it)."""
    description: str = ""
    """What the run shows (presets set it)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    # ---- reading and writing -------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from nested plain values (TOML, JSON); every key is checked."""
        return _build(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            if path.is_dir():
                raise ConfigError(f"config file {path} is a folder; give a .toml file")
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_FILE_BYTES // 2**20} MiB: not a paralab config")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start} cannot be read)") from None
        return cls.loads(text, source=str(path))

    @classmethod
    def loads(cls, text: str, source: str = "config") -> RunConfig:
        text = text.removeprefix("\ufeff")  # a BOM some editors write
        if _nesting(text) > MAX_NESTING:
            raise ConfigError(f"{source} nests more than {MAX_NESTING} levels of [ and {{: not a paralab config")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {shown(str(e))[1:-1]}") from None
        except (RecursionError, MemoryError):
            raise ConfigError(f"{source} is too deeply nested or too large to read") from None
        return cls.from_dict(data)

    def dumps(self) -> str:
        return _dump_toml(self.to_dict())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps(), encoding="utf-8")

    def with_overrides(self, assignments: list[str] | dict[str, Any]) -> RunConfig:
        """Apply `key=value` strings (or a {dotted key: value} dict) with type checks."""
        items = assignments.items() if isinstance(assignments, dict) else [_split_assignment(a) for a in assignments]
        config = self
        for key, value in items:
            config = set_value(config, key, value)
        return config


# ---- dotted keys -----------------------------------------------------------------------------


def field_docs(cls: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """{dotted key: docstring} for every leaf field, read from the source below each field."""
    import inspect

    docs: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = ""
    found = dict(re.findall(r"^\s+(\w+): [^\n]+\n\s+\"\"\"(.*?)\"\"\"", source, re.M | re.S))
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            docs.update(field_docs(hint, f"{prefix}{f.name}."))
        else:
            docs[f"{prefix}{f.name}"] = " ".join(found.get(f.name, "").split())
    return docs


def keys() -> list[str]:
    return list(field_docs())


def get_value(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def set_value(config: RunConfig, key: str, value: Any) -> RunConfig:
    """A copy of config with dotted `key` set to `value` (text or a typed value)."""
    parts = key.strip().split(".")
    return _set(config, parts, value, key.strip())


def _set(obj: Any, parts: list[str], value: Any, key: str) -> Any:
    names = {f.name for f in fields(obj)}
    if parts[0] not in names:
        raise ConfigError(f"unknown setting {shown(key)}; known settings: {', '.join(keys())}")
    hint = typing.get_type_hints(type(obj))[parts[0]]
    if len(parts) == 1:
        if dataclasses.is_dataclass(hint):
            raise ConfigError(f"{key!r} is a section; set one of its keys, e.g. {key}.{fields(hint)[0].name}")
        return replace(obj, **{parts[0]: coerce(hint, value, key)})
    if not dataclasses.is_dataclass(hint):
        raise ConfigError(f"unknown setting {shown(key)}; known settings: {', '.join(keys())}")
    return replace(obj, **{parts[0]: _set(getattr(obj, parts[0]), parts[1:], value, key)})


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Convert text or a plain value to the field's type, or raise ConfigError."""
    text = value.strip() if isinstance(value, str) else value
    try:
        if hint is Bytes:
            return Bytes.parse(text)
        if hint is bool:
            if isinstance(text, bool):
                return text
            if isinstance(text, str) and text.lower() in ("true", "yes", "on", "1"):
                return True
            if isinstance(text, str) and text.lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(text, bool):
                raise ValueError
            if isinstance(text, float):
                if not text.is_integer():
                    raise ValueError
                return int(text)
            return int(text)
        if hint is float:
            if isinstance(text, bool):
                raise ValueError
            result = float(text)
            if result != result or result in (float("inf"), float("-inf")):
                raise ValueError
            return result
        if hint is str:
            if not isinstance(text, str):
                raise ValueError
            return text
        if typing.get_origin(hint) is tuple:
            if isinstance(text, str):
                text = text.strip("[]() ")
                items = [t for t in re.split(r"[,\s]+", text) if t]
            elif isinstance(text, (list, tuple)):
                items = list(text)
            else:
                raise ValueError
            return tuple(coerce(int, item, key) for item in items)
    except (ValueError, TypeError, OverflowError):
        pass
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        hint, "a list of whole numbers like 1,2" if typing.get_origin(hint) is tuple else "a memory size like 24GiB")
    raise ConfigError(f"{shown(key)[1:-1]} must be {kind}, not {shown(value)}")


def _nesting(text: str) -> int:
    """How deep [ and { nest, strings and comments aside (roughly: enough to refuse a bomb)."""
    depth = deepest = 0
    quote = ""
    comment = False
    for ch in text:
        if comment:
            comment = ch != "\n"
        elif quote:
            if ch == quote or ch == "\n":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            comment = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def _split_assignment(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--set takes KEY=VALUE, e.g. train.lr=0.01; got {shown(text)}")
    key, value = text.split("=", 1)
    return key.strip(), value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table of settings, not {shown(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown setting {shown(prefix + unknown[0])}; known settings: {', '.join(keys())}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(hint, value, prefix + name)
    return cls(**kwargs)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Bytes):
        return obj.exact() if int(obj) % 2**20 == 0 else int(obj)
    if isinstance(obj, tuple):
        return list(obj)
    return obj


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _dump_toml(data: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):  # a TOML basic string: control characters escaped, so it reads back
            return '"' + "".join(_TOML_ESCAPES.get(c, f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f" else c)
                                 for c in v) + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    sections = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in data.items() if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(sections) + "\n"

"""Run configuration: one dataclass per concern, composed by ``RunConfig``, read from YAML.

    model:        ModelConfig        which network, how it is loaded
    data:         DataConfig         which corpus, which samples, how they are tokenized
    sensitivity:  SensitivityConfig  estimator, probes, strategy, seed (the core engine's own config)
    layers:       [int, ...]         target hidden_states indices (0 = embeddings, -1 = last)
    cluster:      ClusterConfig      Ray or in-process, actors, batch size, resources
    output:       OutputConfig       run directory (local path or pyarrow.fs URI), plots
    paired:       PairedConfig|None  side b of a paired run (issue 29); null: an ordinary run

Unknown keys are errors at every level, named together with the known ones. Command-line overrides
use dotted keys whose values are parsed as YAML scalars: ``--data.limit=100 --layers=[3,-1]``.

Why this module is long: one dataclass per concern, each field with its comment, and the checks that
turn unknown keys and bad values into one-line errors; splitting the dataclasses from their checks
would put a field's description and its validation in two files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from ._keys import unknown_keys
from .core.options import SensitivityConfig
from .errors import RaysensError, detail_of

BATCH_CPU, BATCH_GPU = 8, 32  # cluster.batch_size: auto on CPU actors / on GPU actors
# cluster.group_by_length: the samples of a window of this many units' worth of consecutive selected
# ids are sorted by text length (characters) before they are cut into units (run/layout.py: plan_units);
# part of the fingerprint, so a change of it is a new layout
LENGTH_WINDOW_UNITS = 64
SOURCE_KINDS = ("auto", "bundled", "jsonl", "text", "parquet", "hf_disk", "hf")


class ConfigError(RaysensError, ValueError):
    """A configuration value or key is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2"  # packaged short name (minilm, smollm2), a local model directory, a .gguf file, or a cached hub id
    trust_remote_code: bool = False  # run model code shipped with a checkpoint; off unless asked for
    device: str = "auto"  # where each actor's float32 copy lives: auto (cuda when the actor has a GPU, else cpu), cpu, cuda

    def __post_init__(self):
        if not self.name.strip():
            raise ConfigError("model.name must not be empty")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"model.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class DataConfig:
    source: str = "bundled"  # "bundled" (English corpus shipped with raysens) or a path / pyarrow.fs URI / dataset name
    kind: str = "auto"  # auto | bundled | jsonl | text (one sample per line) | parquet | hf_disk (save_to_disk) | hf (load_dataset)
    text_column: str = "text"  # column (or JSON key) holding the text; ignored for kind=text
    split: str | None = None  # hf_disk / hf: split of a DatasetDict (default: train when there is one)
    data_files: Any = None  # hf: data_files passed to datasets.load_dataset (e.g. a CSV path)
    limit: int | None = None  # number of samples to run (None: all rows)
    shuffle: bool = False  # pick the `limit` samples at random instead of the first ones
    shuffle_seed: int = 0  # seed of that random pick
    max_seq_len: int = 32  # tokens kept per sample (truncation); the [S, S] maps are at most this big
    min_tokens: int = 2  # samples with fewer tokens (after special tokens and truncation) are skipped and counted
    add_special_tokens: bool = True  # let the tokenizer add its special tokens ([CLS]/[SEP], BOS, ...)

    def __post_init__(self):
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"data.kind must be one of {list(SOURCE_KINDS)}, got {self.kind!r}")
        if self.max_seq_len < 1:
            raise ConfigError(f"data.max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.min_tokens < 1:
            raise ConfigError(f"data.min_tokens must be >= 1, got {self.min_tokens}")
        if self.min_tokens > self.max_seq_len:
            raise ConfigError(f"data.min_tokens ({self.min_tokens}) exceeds data.max_seq_len ({self.max_seq_len}): "
                              "every sample would be skipped")
        if self.shuffle_seed < 0:
            raise ConfigError(f"data.shuffle_seed must be >= 0, got {self.shuffle_seed}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 or null (all rows), got {self.limit}")
        if not self.text_column:
            raise ConfigError("data.text_column must not be empty")


@dataclass(frozen=True)
class ClusterConfig:
    use_ray: bool = True  # false: run the same work units in this process through the core, without Ray
    address: str | None = None  # Ray cluster to join ("auto", "host:port", "ray://host:10001"); None: $RAY_ADDRESS, else an embedded local Ray
    num_actors: int = 1  # size of the actor pool (one model copy each); with max_actors: the pool's minimum
    max_actors: int | None = None  # autoscaling: the pool grows from num_actors to max_actors as the cluster gains resources (KubeRay GPU workers scaling from 0); None: fixed at num_actors
    actor_resources: dict | None = None  # custom Ray resources each actor requires, e.g. {worker: 1} to place actors on nodes that declare them (ray start --resources)
    batch_size: int | str | None = "auto"  # samples per work unit = per engine call (which samples: group_by_length); auto (or null): 32 when the config puts the model on GPUs (model.device cuda, or cluster.gpus_per_actor > 0 with Ray), else 8 — decided from the config alone, so a config always cuts the same units
    group_by_length: bool = True  # units of samples of similar length (less padding): within each window of 64 units' worth of consecutive selected ids, samples sorted by text length (characters; the driver has no tokenizer) then cut into units; false: units of consecutive sample_ids (raysens before issue 31's grouping; resumes run directories written that way). Part of the fingerprint
    cpus_per_actor: float = 1.0  # logical CPUs each actor reserves
    gpus_per_actor: float | None = None  # GPUs each actor reserves. > 0: GPU actors requested (GPU batch sizes, TF32 allowed): the job waits up to gpu_wait_s for num_actors × this many GPUs, asking the autoscaler, then fails in one line — never a CPU run; 0: CPU actors; None (auto): 1 when model.device is cuda (requested), else 1 if the cluster shows GPUs when the pass starts and 0 if not (said in a log line)
    gpu_wait_s: float = 600.0  # how long a job that requests GPU actors waits for the cluster to show their GPUs (KubeRay GPU groups scaled to zero take minutes to come up) before failing
    torch_threads: int | None = None  # intra-op threads per CPU actor; None: (the node's cores - 1) / num_actors, at least 1
    num_cpus: int | None = None  # embedded local Ray only: logical CPUs declared; None: max(4, 2 * num_actors + 2)
    tokenize_cpus: float = 0.25  # logical CPUs per tokenization task
    ship_every_units: int | str = "auto"  # actor-local accumulation: each actor (or the in-process worker) folds its units into one state and ships it to the driver after this many units; auto: 64 with GPUs, 16 without (as batch_size), and no sooner than 10 s after the previous shipment (fast actors ship every 10 s, not every few); 1: ship every unit. A killed actor loses at most its unshipped units (recomputed); results do not depend on it (exact state)
    ship_every_s: float = 60.0  # ...or once this many seconds have passed since the first unshipped unit was folded (checked as units end); the driver also asks for a final shipment at the end of the stream

    def __post_init__(self):
        if self.num_actors < 1:
            raise ConfigError(f"cluster.num_actors must be >= 1, got {self.num_actors}")
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ConfigError(f"cluster.max_actors ({self.max_actors}) must be >= cluster.num_actors ({self.num_actors})")
        for k, v in (self.actor_resources or {}).items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"cluster.actor_resources must map resource names to positive numbers, "
                                  f"got {k!r}: {v!r}")
        if self.batch_size is not None and not isinstance(self.batch_size, int) and self.batch_size != "auto":
            raise ConfigError(f"cluster.batch_size must be a positive integer or auto, got {self.batch_size!r}")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ConfigError(f"cluster.batch_size must be >= 1 (or auto), got {self.batch_size}")
        if self.cpus_per_actor < 0 or (self.gpus_per_actor is not None and self.gpus_per_actor < 0):
            raise ConfigError("cluster.cpus_per_actor / cluster.gpus_per_actor must be >= 0")
        if not self.gpu_wait_s >= 0:
            raise ConfigError(f"cluster.gpu_wait_s must be >= 0, got {self.gpu_wait_s}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"cluster.torch_threads must be >= 1, got {self.torch_threads}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"cluster.num_cpus must be >= 1, got {self.num_cpus}")
        n = self.ship_every_units
        if n != "auto" and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"cluster.ship_every_units must be a positive integer or auto, got {self.ship_every_units!r}")
        if not self.ship_every_s > 0:
            raise ConfigError(f"cluster.ship_every_s must be > 0, got {self.ship_every_s}")
        if not 0 < self.tokenize_cpus:
            raise ConfigError(f"cluster.tokenize_cpus must be > 0, got {self.tokenize_cpus}")


@dataclass(frozen=True)
class OutputConfig:
    dir: str | None = None  # run directory: local path or pyarrow.fs URI (s3://, gs://, file://); None: runs/<model>-<fingerprint>
    plots: bool = True  # write heatmap PNGs into <dir>/plots
    resume: bool = True  # reuse valid partials already in dir (false: refuse to run in a dir that has some)
    progress_every_s: float = 5.0  # seconds between driver progress lines (0: after every unit)
    compact_every: int = 64  # rolling compaction: fold every N contiguous finished units into checkpoint/ and delete their partials (0: keep every partial); results are bit for bit the same
    per_sample: bool = False  # also export every sample's [S, S] map per layer (float32 Parquet under <dir>/per_sample/, ~4·S² bytes per sample and layer)


    def __post_init__(self):
        if self.compact_every < 0:
            raise ConfigError(f"output.compact_every must be >= 0 (0: no compaction), got {self.compact_every}")


PRECISIONS = ("fp32", "bf16", "tf32")  # sensitivity.precision's values (core.options.Precision), for paired.precision


@dataclass(frozen=True)
class PairedConfig:
    """Side b of a paired run (issue 29, docs/DESIGN.md "Paired runs"): the same tokens, the same probes
    (common random numbers), two models; side a is the run's ``model``. Exactly one way of making side b
    may differ from side a: another model, another precision, random weights, or a scaled module (or
    a combination of ``model`` and ``precision``)."""

    model: ModelConfig | None = None  # side b's model (a ModelConfig mapping: name, trust_remote_code); null: the run's model (then precision, random_init or scale must change it)
    precision: str | None = None  # side b's sensitivity.precision (fp32, bf16, tf32); null: the run's
    random_init: bool = False  # side b = side a's config with random weights (seeded by init_seed; nothing is downloaded)
    init_seed: int = 0  # torch seed of random_init's weights
    scale: dict | None = None  # {module: "model.layers.3.mlp", factor: 1.01}: side b = a copy of side a with that module's parameters × factor (side a's copy is never changed)
    layer_map: dict | None = None  # {a_layer: b_layer} hidden_states indices of side b for side a's target layers (default: the same index); required for every target layer when the depths differ
    fdr: float = 0.05  # false-discovery rate of the per-cell tests (Benjamini–Hochberg over every cell of a layer)
    labels: tuple[str, ...] | None = None  # display names of the two sides [a, b]; null: derived from the models and the variant

    def __post_init__(self):
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"paired.precision must be one of {list(PRECISIONS)} or null, got {self.precision!r}")
        if self.init_seed < 0:
            raise ConfigError(f"paired.init_seed must be >= 0, got {self.init_seed}")
        if not 0 < self.fdr < 1:
            raise ConfigError(f"paired.fdr must be in (0, 1), got {self.fdr}")
        if self.scale is not None:
            unknown = unknown_keys(self.scale, ("module", "factor"), "paired.scale.")
            if unknown:
                raise ConfigError(f"unknown config key {unknown}; known keys in paired.scale: module, factor")
            mod, factor = self.scale.get("module"), self.scale.get("factor")
            if not isinstance(mod, str) or not mod.strip():
                raise ConfigError(f"paired.scale.module must name a module of the model (e.g. model.layers.3.mlp), "
                                  f"got {mod!r}")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor == factor \
                    or factor in (float("inf"), float("-inf")):
                raise ConfigError(f"paired.scale.factor must be a finite number (e.g. 1.01), got {factor!r}")
            object.__setattr__(self, "scale", {"module": mod.strip(), "factor": float(factor)})
        if self.layer_map is not None:
            out = {}
            for k, v in self.layer_map.items():
                try:
                    ka = int(k)
                except (TypeError, ValueError):
                    ka = None
                if ka is None or isinstance(k, bool) or isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigError(f"paired.layer_map must map side a's layer indices to side b's (integers), "
                                      f"got {k!r}: {v!r}")
                out[ka] = v
            object.__setattr__(self, "layer_map", out)
        if self.labels is not None and (len(self.labels) != 2 or not all(str(x).strip() for x in self.labels)):
            raise ConfigError(f"paired.labels must be two non-empty names [a, b], got {list(self.labels)!r}")
        variants = [self.model is not None, self.precision is not None, self.random_init, self.scale is not None]
        if self.random_init and any(variants[:2] + variants[3:]) or self.scale is not None and any(variants[:3]):
            raise ConfigError("paired: random_init and scale each make side b from side a's model alone; "
                              "do not combine them with paired.model, paired.precision or each other")

    @property
    def side_b(self) -> dict:
        """What makes side b, as plain values (the worker's ``WorkerSpec.paired``, the manifest)."""
        return {"model": None if self.model is None else {"name": self.model.name,
                                                          "trust_remote_code": self.model.trust_remote_code},
                "precision": self.precision, "random_init": self.random_init,
                "init_seed": self.init_seed if self.random_init else None, "scale": self.scale,
                "layer_map": {str(k): v for k, v in sorted((self.layer_map or {}).items())}}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    layers: tuple[int, ...] = (-1,)  # target hidden_states indices (0 = embeddings, k = after block k, -1 = last)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    paired: PairedConfig | None = None  # side b of a paired run (issue 29: two models on the same tokens and probes); null: an ordinary run

    def __post_init__(self):
        if not self.layers:
            raise ConfigError("layers must list at least one layer index")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def on_gpu(self) -> bool:
        """The config puts the model on GPUs: ``model.device`` cuda, or Ray actors with ``gpus_per_actor`` > 0
        (``auto`` devices are not probed: the config alone decides, see ``batch_size``)."""
        c = self.cluster
        return self.model.device.startswith("cuda") or (c.use_ray and bool(c.gpus_per_actor)
                                                        and self.model.device != "cpu")

    @property
    def batch_size(self) -> int:
        """``cluster.batch_size`` resolved: ``auto`` / null is ``BATCH_GPU`` when ``on_gpu``, else ``BATCH_CPU``.

        The unit size decides which samples share a partial, and the driver merges partials in
        sample_id order, so it changes the last bits of the float64 sums (``mean``, ``m2``, ``sum``):
        it is part of the fingerprint, and because it depends on the config only (never on the
        hardware found at run time) a config always gives the same bits."""
        b = self.cluster.batch_size
        return b if isinstance(b, int) else (BATCH_GPU if self.on_gpu else BATCH_CPU)

    @property
    def ship_every_units(self) -> int:
        """``cluster.ship_every_units`` resolved: ``auto`` is 64 when ``on_gpu``, else 16."""
        n = self.cluster.ship_every_units
        return n if isinstance(n, int) else (64 if self.on_gpu else 16)

    # ------------------------------------------------------------------ dict / YAML
    @classmethod
    def from_dict(cls, d: dict | None) -> "RunConfig":
        return _build(cls, d or {}, "")

    def to_dict(self) -> dict:
        return _plain(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the numbers or which samples are in which work unit.

        Partials in a run directory are only reused by a run with the same fingerprint. Pool size,
        resources, address and output settings are not part of it.
        """
        return self._fingerprint(self.cluster.group_by_length)

    def legacy_fingerprint(self) -> str:
        """The fingerprint this config had before units were grouped by length (= ``fingerprint()``
        with ``cluster.group_by_length: false``): names an older run directory on resume."""
        return self._fingerprint(False)

    def _fingerprint(self, by_length: bool) -> str:
        d = self.to_dict()
        key = {"model": {k: d["model"][k] for k in ("name", "trust_remote_code")}, "data": d["data"],
               "sensitivity": d["sensitivity"], "layers": sorted(set(d["layers"])),
               "batch_size": self.batch_size}
        if by_length:  # off: the fingerprint of the consecutive layout (older run directories)
            key["units"] = {"group_by": "chars", "window_units": LENGTH_WINDOW_UNITS}
        if self.paired is not None:  # side b changes every number of a paired run (fdr and labels do not)
            key["paired"] = self.paired.side_b
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        if isinstance(obj, SensitivityConfig):
            return obj.to_dict()
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    if isinstance(obj, Enum):
        return obj.value
    return obj


def _check_type(value, hint, key: str):
    """Validate (and lightly coerce: int -> float, list -> tuple) a YAML value against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if hint is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _check_keys(cls, d, prefix: str) -> None:
    where = prefix.rstrip(".") or "config"
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {d!r}")
    known = [f.name for f in fields(cls)]
    named = unknown_keys(d, known, prefix)
    if named:
        n = len(set(d) - set(known))
        raise ConfigError(f"unknown config key{'s' if n > 1 else ''} {named}; known keys in {where}: {', '.join(known)}")


def _dataclass_of(hint):
    """The dataclass of a hint (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        subs = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return subs[0] if len(subs) == 1 else None
    return None


def _build(cls, d, prefix: str):
    where = prefix.rstrip(".") or "config"
    _check_keys(cls, d, prefix)
    hints = typing.get_type_hints(cls)
    kw = {}
    for name, value in d.items():
        hint, key = hints[name], prefix + name
        sub = _dataclass_of(hint)
        if sub is not None and value is None and hint is not sub:  # an optional section set to null
            kw[name] = None
            continue
        if sub is SensitivityConfig:
            _check_keys(sub, value, key + ".")
            try:
                kw[name] = SensitivityConfig.from_dict(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{key}: {detail_of(exc)}") from None
        elif sub is not None:
            kw[name] = _build(sub, value, key + ".")
        else:
            kw[name] = _check_type(value, hint, key)
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------- files and overrides
def parse_overrides(args: list[str]) -> dict:
    """``["--data.limit=100", "--layers=[3,-1]"]`` -> nested dict; values are YAML scalars.

    ``--address=...`` is short for ``--cluster.address=...``.
    """
    import yaml

    out: dict = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key=value (e.g. --data.limit=100)")
        key, raw = arg[2:].split("=", 1)
        if key == "address":
            key = "cluster.address"
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {arg!r}: value is not valid YAML ({exc})") from None
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict, over: dict) -> dict:
    """Recursive merge; values of ``over`` win."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """The mapping in a YAML file; a missing file, bad YAML or a non-mapping is a ConfigError naming ``what``."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping")
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read a YAML config (None: all defaults) and apply overrides (CLI strings or a nested dict)."""
    base = read_yaml_mapping(path, "config file") if path is not None else {}
    over = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    return RunConfig.from_dict(merge_dicts(base, over))

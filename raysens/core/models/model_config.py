"""A model's shape (``model_type``, ``num_hidden_layers``, ``hidden_size``) read from its
``config.json`` with ``json``: what a run's driver needs to resolve layers and plan units, without
importing ``transformers`` (whose utilities import torch, ~300 MB of a driver's RSS) and without
reading a weight file (issue 31). A model whose config cannot be read that way (a hub id, a GGUF file
not yet converted, ``random:``/``synthetic:`` models, a config without these fields) falls back to
``models.load_tokenizer_and_config``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .hub import _gguf_cache_dir, load_tokenizer_and_config, packaged_model_path
from .registry import source_kind

_FIELDS = {"num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
           "hidden_size": ("hidden_size", "n_embd", "d_model", "dim")}


def _config_json(name: str) -> Path | None:
    kind = source_kind(name) if isinstance(name, str) else None
    if kind in (None, "synthetic", "random"):
        return None
    try:
        path = packaged_model_path(name) if kind == "packaged" else Path(name).expanduser()
    except Exception:  # noqa: BLE001 - the fallback reports it
        return None
    if path.suffix == ".gguf" and path.is_file():
        path = _gguf_cache_dir(path)
    cfg = path / "config.json"
    return cfg if cfg.is_file() else None


def model_shape(name: str, *, trust_remote_code: bool = False) -> dict:
    """``{"model_type", "num_hidden_layers", "hidden_size"}`` of the model named as in
    ``load_model`` (see the module doc)."""
    cfg_path = _config_json(name)
    if cfg_path is not None:
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            cfg = None
        if isinstance(cfg, dict) and isinstance(cfg.get("model_type"), str):
            out = {"model_type": cfg["model_type"]}
            for key, names in _FIELDS.items():
                out[key] = next((cfg[n] for n in names if isinstance(cfg.get(n), int) and not isinstance(cfg[n], bool)),
                                None)
            if out["num_hidden_layers"] is not None:
                out["hidden_size"] = int(out["hidden_size"] or 0)
                return out
    _, mcfg = load_tokenizer_and_config(name, trust_remote_code=trust_remote_code)
    return {"model_type": getattr(mcfg, "model_type", None), "num_hidden_layers": int(mcfg.num_hidden_layers),
            "hidden_size": int(getattr(mcfg, "hidden_size", 0) or 0)}

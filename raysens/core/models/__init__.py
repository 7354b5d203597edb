"""Model adaptation: loading a model for analysis and what the engine needs to know about it.

The public face is ``load_model``, ``load_tokenizer_and_config``, ``LoadedModel``, ``ModelLoadError``,
``packaged_model_path`` and ``prepare_for_analysis`` (the import path ``raysens.core.models`` the README
documents). Names resolve lazily (PEP 562): a driver that only reads a model's config imports neither
torch nor transformers.

Modules: ``hub`` (names, Hugging Face / GGUF loading and the GGUF cache), ``loading`` (safetensors
streaming straight onto the device), ``identity`` (weight digests for the manifest), ``structure``
(blocks, causality, layer indices), ``conventions`` (how a model is called), ``analysis_copy`` (the
engine's own float32 module tree), ``synthetic`` (weightless models for pipeline benchmarks),
``model_config`` (shapes from a config).
"""

from __future__ import annotations

from ..lazy import face

_PUBLIC = {"load_model": "hub", "load_tokenizer_and_config": "hub", "LoadedModel": "hub",
           "ModelLoadError": "hub", "packaged_model_path": "hub", "prepare_for_analysis": "hub",
           "cache_root": "hub"}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = face(__name__, _PUBLIC, globals())

"""Compatibility import path (documented in earlier READMEs): the code lives in ``raysens.core.models``."""

from .core.models import LoadedModel, ModelLoadError, load_model, load_tokenizer_and_config, prepare_for_analysis  # noqa: F401

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "load_tokenizer_and_config", "prepare_for_analysis"]

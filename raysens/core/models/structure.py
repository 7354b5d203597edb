"""What the engine needs to know about a Hugging Face model's structure: its transformer blocks,
whether it is causal, and which ``hidden_states`` indices a layer spec names. Torch/transformers only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raysens.errors import ArgumentError


def find_blocks(base: torch.nn.Module, n_layers: int, required: bool = True) -> torch.nn.ModuleList | None:
    """The first ``ModuleList`` of ``n_layers`` modules in ``base``; when there is none, None
    (``required=False``: the engine then reads the model's own ``output_hidden_states``) or ValueError."""
    import torch  # here, not at the top: a Ray driver resolves layers without importing torch (issue 31)

    for _, mod in base.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers:
            return mod
    if not required:
        return None
    raise ValueError(f"SensitivityEngine: cannot find the {n_layers} transformer blocks of {type(base).__name__}")


_ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
                  "xlm-roberta", "camembert", "modernbert"}


def is_causal_model(model: torch.nn.Module) -> bool:
    """True when output position i cannot depend on input positions j > i."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        if type(model).__name__.endswith(("Encoder", "EncoderModel", "Stack")):
            return False  # the encoder of a seq2seq model (conventions.encoder_of)
        raise ValueError(f"SensitivityEngine: {type(model).__name__} is an encoder-decoder model; pass it to "
                         f"SensitivityEngine (which analyses its encoder) or pass its get_encoder()")
    if cfg.model_type in _ENCODER_TYPES:
        return bool(getattr(cfg, "is_decoder", False))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def resolve_layer_indices(layers: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Absolute hidden_states indices (0..n_layers, sorted, deduplicated) for a model with
    ``n_layers`` blocks; negatives count from the end. Needs only the model's config."""
    if isinstance(layers, (int, np.integer)):
        ls = [layers]
    else:
        try:
            ls = list(layers)
        except TypeError:
            raise ArgumentError(call="SensitivityEngine.compute", detail=f"layer must be an int or a sequence of ints, "
                             f"got {layers!r}") from None
    if not ls:
        raise ArgumentError(call="SensitivityEngine.compute", detail="layers is empty")
    out = set()
    for layer in ls:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ArgumentError(call="SensitivityEngine.compute", detail=f"layer must be an int, got {layer!r}")
        a = int(layer) + n_layers + 1 if layer < 0 else int(layer)
        if not 0 <= a <= n_layers:
            raise ArgumentError(call="SensitivityEngine.compute", detail=f"layer {layer} out of range; this model has hidden_states "
                f"0..{n_layers} (or -{n_layers + 1}..-1)")
        out.add(a)
    return tuple(sorted(out))

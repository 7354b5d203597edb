"""Model loading: packaged models, float32 conversion, GGUF cache, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from refs import minilm
from raysens.core.models import ModelLoadError, load_model, prepare_for_analysis


def _assert_ready(model):
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    assert not model.training and all(not m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "eager"


def test_minilm_is_ready_for_analysis():
    lm = minilm()
    _assert_ready(lm.model)
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.pad_token_id is not None
    assert lm.info["model_type"] == "bert" and lm.info["num_hidden_layers"] == 6
    assert lm.info["hidden_size"] == 384
    assert lm.info["parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert 0 < lm.info["non_embedding_parameters"] < lm.info["parameters"]
    assert lm.name == "minilm" and lm.source.endswith("model")
    # real (trained) weights: two different sentences give different, finite embeddings
    enc = lm.tokenizer(["a cat", "the stock market"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = lm.model(**enc).last_hidden_state
    assert torch.isfinite(h).all() and h.shape[-1] == 384
    assert (h[0, 0] - h[1, 0]).abs().max() > 0.1


def _tokenizer_without_pad():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=60, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    src = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    src.save_pretrained(tmp_path)
    tok = _tokenizer_without_pad()
    assert tok.pad_token is None
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "bfloat16" in (saved.get("dtype"), saved.get("torch_dtype"))
    assert any(p.name.endswith(".safetensors") for p in tmp_path.iterdir())

    lm = load_model(str(tmp_path))
    _assert_ready(lm.model)
    assert type(lm.model).__name__ == "LlamaModel"  # the stack: no LM head is loaded
    assert lm.info["class"] == "LlamaForCausalLM" and lm.info["stack_class"] == "LlamaModel"
    assert lm.tokenizer.pad_token == "</s>"  # set from eos when the checkpoint has none
    ref = {k: v.float() for k, v in src.model.state_dict().items()}
    got = lm.model.state_dict()
    assert set(ref) == set(got)
    for k, v in ref.items():  # bf16 → fp32 is exact
        assert torch.equal(got[k], v), k
    assert lm.info["num_hidden_layers"] == 2 and lm.source == str(tmp_path.resolve())


def test_prepare_for_analysis_converts_once_and_is_idempotent():
    import transformers as tf

    cfg = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=30, n_positions=16, attn_implementation="sdpa")
    m = tf.GPT2LMHeadModel(cfg).to(torch.bfloat16).train()
    m = prepare_for_analysis(m)
    _assert_ready(m)
    w = m.transformer.h[0].attn.c_attn.weight
    m2 = prepare_for_analysis(m)
    assert m2 is m and m.transformer.h[0].attn.c_attn.weight is w  # no second conversion


def test_load_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match="model path .* does not exist") as ei:  # not a hub message
        load_model(str(missing))
    assert str(missing) in str(ei.value) and "hub" not in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="non-empty string"):
        load_model("  ")
    with pytest.raises(ModelLoadError, match="non-empty string"):
        load_model(None)  # type: ignore[arg-type]
    # a config.json but no weights
    cfgdir = tmp_path / "cfgonly"
    cfgdir.mkdir()
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(cfgdir)
    with pytest.raises(ModelLoadError):
        load_model(str(cfgdir))


@pytest.mark.slow
def test_smollm2_cached_load_equals_first_load(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSENS_CACHE", str(tmp_path))
    first = load_model("smollm2")  # dequantises the GGUF and writes the float32 cache
    cached = list((tmp_path / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").exists() and (cached[0] / "config.json").exists()
    assert not [p for p in (tmp_path / "gguf").iterdir() if ".tmp" in p.name]
    second = load_model("smollm2")  # from the cache
    for lm in (first, second):
        _assert_ready(lm.model)
        assert lm.tokenizer.pad_token is not None
    assert first.info == second.info and first.info["num_hidden_layers"] == 30
    sd1, sd2 = first.model.state_dict(), second.model.state_dict()
    assert set(sd1) == set(sd2)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    ids = first.tokenizer("Hello there, small model.", return_tensors="pt")["input_ids"][:, :6]
    assert torch.equal(ids, second.tokenizer("Hello there, small model.", return_tensors="pt")["input_ids"][:, :6])
    with torch.no_grad():
        h1 = first.model(input_ids=ids, output_hidden_states=True).hidden_states
        h2 = second.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(h1) == len(h2) == 31
    for a, b in zip(h1, h2):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)
    assert np.isfinite(h1[-1].numpy()).all()

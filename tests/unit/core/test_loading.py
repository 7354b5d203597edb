"""Loading straight onto the device (``raysens.core.models.loading`` through ``load_model``): the stack only
(no LM head tensor is ever allocated), float32, bit for bit the checkpoint's weights, and the
engine's numbers on it equal to those on a reference model built by ``transformers``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refs import make_model, minilm, padded, random_ids
from raysens.core.engine import SensitivityConfig, SensitivityEngine
from raysens.core.models.loading import build_stack, load_base_model
from raysens.core.models import load_model


def _save(model, path, **kw):
    from transformers import AutoTokenizer

    from raysens.core.models import packaged_model_path

    model.save_pretrained(path, **kw)
    AutoTokenizer.from_pretrained(str(packaged_model_path("minilm"))).save_pretrained(path)
    return path


def _llama(tie: bool):
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(3)
    m = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a weight left at its init value shows
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


def _engine_values(model, ids, am, mode="reverse"):
    eng = SensitivityEngine(model, SensitivityConfig(estimator="exact", mode=mode))
    res = eng.compute(ids, am, layers=[1, 3], sample_ids=[0, 1])
    return res


@pytest.mark.parametrize("tie,shard", [(False, None), (True, "20KB")])
def test_loaded_stack_is_the_checkpoint_bit_for_bit(tmp_path, tie, shard):
    src = _llama(tie)
    _save(src, tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    lm = load_model(str(tmp_path))
    ref = src.model.state_dict()  # the stack of the reference, as transformers built it
    got = lm.model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    # no LM head: not a module of the loaded model, and the parameters are exactly the stack's
    assert type(lm.model).__name__ == "LlamaModel" and not hasattr(lm.model, "lm_head")
    assert not any("lm_head" in n for n, _ in lm.model.named_parameters())
    n_stack = sum(p.numel() for p in src.model.parameters())
    assert sum(p.numel() for p in lm.model.parameters()) == n_stack == lm.info["parameters"]
    assert n_stack < sum(p.numel() for p in src.parameters()) or tie
    assert all(p.device.type == "cpu" and not p.requires_grad for p in lm.model.parameters())
    # non-persistent buffers (rotary frequencies) equal a normal build's, in float32
    for (n, b), (n2, b2) in zip(lm.model.named_buffers(), src.model.named_buffers()):
        assert n == n2 and b.dtype == b2.dtype and torch.equal(b, b2), n


def test_engine_on_the_loaded_model_equals_the_reference(tmp_path):
    src = _llama(False)
    _save(src, tmp_path)
    lm = load_model(str(tmp_path))
    ids, am = padded([random_ids(7, 1), random_ids(5, 2)], "right")
    for mode in ("reverse", "forward"):
        a, b = _engine_values(lm.model, ids, am, mode), _engine_values(src, ids, am, mode)
        assert a.layers == b.layers
        for L in a.layers:
            assert np.array_equal(a.values[L], b.values[L]), (mode, L)
            assert np.abs(a.values[L]).max() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_checkpoint_is_widened_to_float32_exactly(tmp_path, dtype):
    src = _llama(False).to(dtype)
    _save(src, tmp_path)
    lm = load_model(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    for k, v in src.model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v.float()), k


def test_gpt2_and_bert_checkpoints(tmp_path):
    """Other prefixes (``transformer.``; BERT saved without one) and a tied GPT-2 head."""
    for kind in ("gpt2", "bert"):
        src = make_model(kind)
        d = _save(src, tmp_path / kind)
        lm = load_model(str(d))
        ref = src.base_model.state_dict()
        got = lm.model.state_dict()
        assert set(got) == set(ref), kind
        for k, v in ref.items():
            assert torch.equal(got[k], v.float()), (kind, k)
        assert type(lm.model).__name__ == type(src.base_model).__name__


def test_minilm_equals_transformers_own_load():
    import transformers as tf

    from raysens.core.models import packaged_model_path

    lm = minilm()
    ref = tf.AutoModel.from_pretrained(str(packaged_model_path("minilm")), dtype=torch.float32,
                                       attn_implementation="eager").eval()
    got = lm.model.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    ids = lm.tokenizer(["a cat sat on the mat", "stocks fell"], return_tensors="pt", padding=True)
    a = _engine_values(lm.model, ids["input_ids"], ids["attention_mask"])
    b = _engine_values(ref, ids["input_ids"], ids["attention_mask"])
    for L in a.layers:
        assert np.array_equal(a.values[L], b.values[L]), L


def test_build_stack_allocates_no_head():
    """The LM head of the full model is on the meta device while the stack is built, then dropped."""
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=50_000, tie_word_embeddings=False)
    stack = build_stack(cfg, tf.AutoModelForCausalLM)
    assert type(stack).__name__ == "LlamaModel"
    assert all(p.device.type == "meta" for p in stack.parameters())  # nothing read yet, nothing allocated
    assert all(b.device.type == "cpu" for b in stack.buffers())


def test_unknown_layout_falls_back_to_transformers(tmp_path):
    """A checkpoint whose keys do not cover the stack: ``load_base_model`` says so (None) and
    ``load_model`` loads it with transformers, warning once."""
    import transformers as tf
    from safetensors.torch import save_file

    src = _llama(False)
    _save(src, tmp_path)
    sd = {f"renamed.{k}": v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert load_base_model(tmp_path, tf.AutoConfig.from_pretrained(str(tmp_path)), tf.AutoModelForCausalLM,
                           "cpu") is None
    with pytest.warns(UserWarning, match="checkpoint layout not read directly"):
        lm = load_model(str(tmp_path))
    assert type(lm.model).__name__ == "LlamaModel"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_is_on_the_device(tmp_path):
    src = _llama(False)
    _save(src, tmp_path)
    lm = load_model(str(tmp_path), device="cuda")
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in lm.model.parameters())
    for k, v in src.model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k].cpu(), v), k


def test_a_weight_of_the_wrong_shape_is_a_one_line_error(tmp_path):
    import json

    from raysens.core.models import ModelLoadError

    _save(_llama(False), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"load_model: weight 'layers.0.mlp.\w+_proj.weight' has shape "
                                             r"\[\d+, \d+\] in .*model.safetensors, the model config expects"):
        load_model(str(tmp_path))


def test_model_shape_from_config_json_equals_transformers_config(tmp_path):
    """The driver's torch-free read of config.json (``core.models.model_config``) gives what transformers'
    config says, GPT-2's own field names included; a name it cannot read falls back to it."""
    import sys

    from raysens.core.models.model_config import model_shape
    from raysens.core.models import load_tokenizer_and_config

    names = ["minilm", "random:tiny-gpt2"]
    for kind in ("gpt2", "llama", "bert"):
        names.append(str(_save(make_model(kind), tmp_path / kind)))
    for name in names:
        _, cfg = load_tokenizer_and_config(name)
        want = {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size}
        assert model_shape(name) == want, name
    assert "raysens.core.models.model_config" in sys.modules

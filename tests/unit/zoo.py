"""Tiny seeded random Hugging Face models of many architectures (no downloads) and an independent
float64 oracle of ``A_ij = ‖∂h_i/∂e_j‖_F²`` through the model's own forward from ``input_ids``
(docs/DESIGN.md §1.1): the output of ``get_input_embeddings()`` is replaced, by a forward hook, with
the variable ``torch.func.jacrev`` differentiates (plain ``torch.autograd.functional.jacobian`` where
jacrev refuses an old-style ``autograd.Function``: BLOOM), so every derived input (position ids, ALiBi,
masks, embedding scaling after the embedding module) is the model's own for that sample alone."""

from __future__ import annotations

import copy

import numpy as np
import torch

VOCAB = 64
D = 16  # hidden width of every tiny model
COMMON = dict(vocab_size=VOCAB, initializer_range=0.2, attn_implementation="eager")
LLAMA_LIKE = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
BERT_LIKE = dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=1)

# name -> (Config class, model class, config kwargs, what it covers)
SPECS: dict[str, tuple[str, str, dict, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE, "rotary, GQA, RMSNorm (hand-written path)"),
    "mistral-sliding": ("MistralConfig", "MistralModel", dict(LLAMA_LIKE, sliding_window=3),
                        "sliding-window attention shorter than the sample"),
    "qwen3": ("Qwen3Config", "Qwen3Model", dict(LLAMA_LIKE, head_dim=8), "q/k norms"),
    "gemma": ("GemmaConfig", "GemmaModel", dict(LLAMA_LIKE, head_dim=8, num_key_value_heads=1),
              "MQA, √D embedding scaling inside the model, 1+w norms"),
    "gemma2": ("Gemma2Config", "Gemma2Model", dict(LLAMA_LIKE, head_dim=8, sliding_window=3),
               "local/global layers, pre+post norms, logit soft-capping"),
    "gemma3": ("Gemma3TextConfig", "Gemma3TextModel", dict(LLAMA_LIKE, head_dim=8, sliding_window=3),
               "scaled embedding module, local/global rotary bases"),
    "phi": ("PhiConfig", "PhiModel", dict(LLAMA_LIKE, partial_rotary_factor=0.5),
            "partial rotary, parallel attention/MLP"),
    "phi3": ("Phi3Config", "Phi3Model", dict(LLAMA_LIKE), "fused qkv / gate-up projections"),
    "olmo2": ("Olmo2Config", "Olmo2Model", dict(LLAMA_LIKE), "post-norms, q/k norms"),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXModel", dict(hidden_size=D, intermediate_size=2 * D,
                  num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=64,
                  use_parallel_residual=True, pad_token_id=0), "partial rotary, parallel residual"),
    "gptj": ("GPTJConfig", "GPTJModel", dict(n_embd=D, n_layer=2, n_head=4, rotary_dim=2, n_positions=64,
              pad_token_id=0), "interleaved partial rotary, parallel block"),
    "falcon": ("FalconConfig", "FalconModel", dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
                multi_query=True, parallel_attn=True, pad_token_id=0), "MQA, parallel attention, rotary"),
    "falcon-alibi": ("FalconConfig", "FalconModel", dict(hidden_size=D, num_hidden_layers=2,
                      num_attention_heads=4, alibi=True, new_decoder_architecture=False, multi_query=False,
                      parallel_attn=False, pad_token_id=0), "ALiBi"),
    "bloom": ("BloomConfig", "BloomModel", dict(hidden_size=D, n_layer=2, n_head=4, pad_token_id=0),
              "ALiBi, old-style autograd.Function GELU"),
    "opt": ("OPTConfig", "OPTModel", dict(hidden_size=D, ffn_dim=2 * D, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=D, pad_token_id=1),
            "learned positions offset by 2"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=D, n_layer=2, n_head=4, n_positions=64),
             "learned positions (hand-written path)"),
    "gpt-bigcode": ("GPTBigCodeConfig", "GPTBigCodeModel", dict(n_embd=D, n_layer=2, n_head=4,
                     n_positions=64, multi_query=True), "MQA, learned positions"),
    "mixtral": ("MixtralConfig", "MixtralModel", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
                "mixture-of-experts routing (top-2)"),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeModel", dict(LLAMA_LIKE, moe_intermediate_size=D,
                   shared_expert_intermediate_size=D, num_experts=4, num_experts_per_tok=2),
                  "MoE with a shared expert"),
    "bert": ("BertConfig", "BertModel", dict(BERT_LIKE, pad_token_id=0), "encoder, post-norm (hand-written path)"),
    "roberta": ("RobertaConfig", "RobertaModel", BERT_LIKE, "positions from padding_idx + 1"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", BERT_LIKE, "positions from padding_idx + 1"),
    "albert": ("AlbertConfig", "AlbertModel", dict(BERT_LIKE, embedding_size=8, pad_token_id=0),
               "factorised embeddings (e narrower than hidden), shared block weights"),
    "distilbert": ("DistilBertConfig", "DistilBertModel", dict(dim=D, hidden_dim=2 * D, n_layers=2, n_heads=4,
                    max_position_embeddings=64, pad_token_id=0), "encoder without token types"),
    "electra": ("ElectraConfig", "ElectraModel", dict(BERT_LIKE, embedding_size=8, pad_token_id=0),
                "embedding projection"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", dict(BERT_LIKE, pad_token_id=0, relative_attention=True,
                    position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                    position_biased_input=False), "disentangled relative attention"),
    "mpnet": ("MPNetConfig", "MPNetModel", BERT_LIKE, "relative bias + positions from padding_idx + 1"),
    "modernbert": ("ModernBertConfig", "ModernBertModel", dict(hidden_size=D, intermediate_size=2 * D,
                    num_hidden_layers=3, num_attention_heads=4, local_attention=4, global_attn_every_n_layers=2,
                    max_position_embeddings=64, pad_token_id=0), "encoder, rotary, local/global attention"),
    "bart": ("BartConfig", "BartModel", dict(d_model=D, encoder_layers=2, decoder_layers=1,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * D, decoder_ffn_dim=2 * D,
              max_position_embeddings=64, pad_token_id=1, scale_embedding=True),
             "encoder of a seq2seq model: learned positions offset by 2, scaled embeddings"),
    "t5-seq2seq": ("T5Config", "T5ForConditionalGeneration", dict(d_model=D, d_kv=4, d_ff=2 * D, num_layers=2,
                    num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8, pad_token_id=0),
                   "encoder of a seq2seq model (T5)"),
    "mamba": ("MambaConfig", "MambaModel", dict(hidden_size=D, state_size=4, num_hidden_layers=2, expand=2,
               conv_kernel=3, pad_token_id=0), "state-space model; hidden_states[k] = after block k"),
    "t5-encoder": ("T5Config", "T5EncoderModel", dict(d_model=D, d_kv=4, d_ff=2 * D, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, pad_token_id=0), "relative position buckets (encoder)"),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The named tiny model with seeded random weights (norm gains and biases randomised too)."""
    import transformers as tf

    cfg_cls, model_cls, kw, _ = SPECS[name]
    cfg = getattr(tf, cfg_cls)(**{**COMMON, **kw})
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1 and pname.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.ndim == 1 and pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def oracle(model: torch.nn.Module, ids, layers) -> dict[int, np.ndarray]:
    """float64 ``{layer: A [S, S]}`` of one unpadded sample ``ids`` (``[S]``), ``layers`` absolute
    ``hidden_states`` indices: ``torch.func.jacrev`` of the model's own forward from ``input_ids``
    (``output_hidden_states``) with respect to the embedding module's output."""
    m = copy.deepcopy(model).double().eval()
    if getattr(m.config, "is_encoder_decoder", False):
        m = m.get_encoder()  # the encoder of a seq2seq model is what the engine analyses
    if getattr(m.config, "_experts_implementation", None) not in (None, "eager"):
        m.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    emb_w = m.get_input_embeddings().weight
    # every embedding module over the input-embedding weights (T5's encoder calls its own tied copy)
    emb_mods = [mod for mod in m.modules() if isinstance(mod, torch.nn.Embedding) and mod.weight is emb_w]
    ids = torch.as_tensor(ids).long().reshape(1, -1)
    with torch.no_grad():
        e = m.get_input_embeddings()(ids)[0]
    sub: list = [None]

    def hook(_mod, _args, out):
        return sub[0] if sub[0] is not None else out

    handles = [mod.register_forward_hook(hook) for mod in emb_mods]
    kw = {"use_cache": False} if "use_cache" in _params(m) else {}

    def f(x):
        sub[0] = x[None]
        out = m(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **kw)
        hs = out.hidden_states if getattr(out, "hidden_states", None) is not None else out.encoder_hidden_states
        return torch.stack([hs[L][0] for L in layers])  # [layers, S, H]

    try:
        try:
            J = torch.func.jacrev(f)(e).detach()  # [layers, S, H, S, D]
        except RuntimeError as exc:  # an old-style autograd.Function (BLOOM): plain autograd, row by row
            if "setup_context" not in str(exc):
                raise
            J = torch.autograd.functional.jacobian(f, e).detach()
    finally:
        for h in handles:
            h.remove()
    A = (J ** 2).sum(dim=(2, 4)).numpy()
    return {L: A[k] for k, L in enumerate(layers)}


def _params(mod) -> set:
    import inspect

    return set(inspect.signature(mod.forward).parameters)

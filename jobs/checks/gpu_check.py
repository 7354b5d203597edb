"""Correctness of the Ray-free core on a CUDA device (run on a lent GPU machine; no Ray needed).

    python -m jobs.checks.gpu_check       # from the repository root; exits non-zero if any check fails

No raysens install needed (``python -m`` from the root imports the working tree's raysens); torch
with CUDA, transformers and numpy are.

Checks, on random-weight tiny GPT-2 / Llama / BERT configs: ``exact`` on CUDA against
``torch.func.jacrev`` in float64 on CUDA (relative Frobenius error ≤ 1e-5), and ``hutchinson`` on
CUDA equal to ``hutchinson`` on CPU for the same (seed, sample_id, layer) (probes are drawn on the
host, so only float rounding differs).
"""

import argparse
import copy
import sys

import numpy as np
import torch
import transformers

from jobs.harness import log
from raysens.core.engine import SensitivityConfig, SensitivityEngine


def configs():
    kw = dict(attn_implementation="eager")
    yield "gpt2", transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, **kw))
    yield "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **kw))
    yield "bert", transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **kw))


def reference(model, ids, layer):
    md = copy.deepcopy(model).double()
    e = md.get_input_embeddings()(ids).detach()

    def f(x):
        return md.base_model(inputs_embeds=x[None], output_hidden_states=True).hidden_states[layer][0]

    jac = torch.func.jacrev(f)(e)  # [pos_out, hidden, pos_in, d_model]
    return (jac ** 2).sum((1, 3)).cpu().numpy()


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m jobs.checks.gpu_check", description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=__doc__.split("\n", 1)[1]).parse_args(argv)
    assert torch.cuda.is_available(), "gpu_check: no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    failures = 0
    for name, model in configs():
        model = model.cuda().eval().requires_grad_(False)
        ids = torch.randint(0, 100, (2, 10), device="cuda")
        eng = SensitivityEngine(model, SensitivityConfig(estimator="exact"))
        res = eng.compute(ids, layers=[1, -1])
        for L in res.layers:
            ref = reference(model, ids[0], L)
            err = np.linalg.norm(res.values[L][0] - ref) / np.linalg.norm(ref)
            ok = err <= 1e-5
            failures += not ok
            log(f"{name:6s} exact layer {L}: rel Frobenius error vs jacrev(float64) {err:.2e} {'OK' if ok else 'FAIL'}")
        cfg = SensitivityConfig(estimator="hutchinson", num_probes=3, seed=7)
        gpu = SensitivityEngine(model, cfg).compute(ids, layers=-1, sample_ids=[5, 9])
        cpu = SensitivityEngine(copy.deepcopy(model).cpu(), cfg).compute(ids.cpu(), layers=-1, sample_ids=[5, 9])
        L = gpu.layers[0]
        err = np.abs(gpu.values[L] - cpu.values[L]).max() / np.abs(cpu.values[L]).max()
        ok = err <= 1e-5
        failures += not ok
        log(f"{name:6s} hutchinson cuda vs cpu (same probes): max rel diff {err:.2e} {'OK' if ok else 'FAIL'}")
    log(f"gpu_check: {failures} failure(s) on {torch.cuda.get_device_name()}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

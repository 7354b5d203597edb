"""Peak host RSS while loading a safetensors model (issue 31): the new loader against the old path.

    python -m jobs.bench.load_rss                       # ~0.52 GB float32 Llama, device cpu
    python -m jobs.bench.load_rss --device cuda         # on a GPU machine
    python -m jobs.bench.load_rss --dtype bfloat16      # a bf16 checkpoint (widened to float32 on load)

Saves a random-weight Llama-family model (built from a ``transformers`` config, no download; untied
LM head, as Llama-3 has) as safetensors into a temporary directory, then loads it in a fresh child
process per variant, one after another, and prints JSON:

- ``new``: ``raysens.core.models.load_model(dir, device=...)`` (``core.models.loading``: the stack only,
  read tensor by tensor straight into its float32 tensors on the device);
- ``old_dir``: what ``load_model`` did before for a directory: ``AutoModelForCausalLM.from_pretrained
  (dtype=float32)`` on the host, ``prepare_for_analysis``, then ``.to(device)``;
- ``old_cached``: what it did before for a cached GGUF conversion (smollm2): ``from_config`` (a random
  float32 init) then ``safetensors.torch.load_model``, then ``.to(device)``.

Each child imports torch and transformers first and records its RSS (``rss_before_mb``), then
loads; the parent samples the child's RSS every 5 ms (``jobs.harness.RssSampler``) and the child reports its peak RSS
(``VmHWM``; ``ru_maxrss`` would include the parent's RSS at the fork) after the load and again after
a first use of every weight (a sum: ``transformers`` maps the file and reads it lazily on the CPU, so
the old directory path costs its host memory at first use). ``peak_over_file``: the child's peak RSS / the weight file's size; ``load_over_file``:
(peak − RSS before the load) / file size, what the load itself costs in host memory. The issue's
target is ``load_over_file`` <= 1.3 for ``new``; ``load_and_use_over_file`` counts the first use too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from jobs.harness import add_json_arg, log, proc_status_mib, ready, run_child, write_json


def child(spec: dict) -> dict:
    """Child-process body: one load (``spec``: variant, path, device) and a first use of every weight."""
    import safetensors.torch
    import torch
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401  (imports before the baseline RSS)

    from raysens.core import loading, models  # noqa: F401

    variant, path, device = spec["variant"], spec["path"], spec["device"]
    before = proc_status_mib("VmRSS")
    ready()  # the parent's sampler starts
    t0 = time.perf_counter()
    if variant == "new":
        lm = models.load_model(path, device=device)
        model = lm.model
    elif variant == "old_dir":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation="eager", use_safetensors=True)
        model = models.prepare_for_analysis(model).to(device)
    elif variant == "old_cached":
        config = transformers.AutoConfig.from_pretrained(path)
        config._attn_implementation = "eager"
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        safetensors.torch.load_model(model, path + "/model.safetensors")
        model = models.prepare_for_analysis(model).to(device)
    else:
        raise SystemExit(f"unknown variant {variant}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    # this process's peak RSS: VmHWM (reset at exec, unlike ru_maxrss, which keeps the parent's)
    after, hwm_load = proc_status_mib("VmRSS"), proc_status_mib("VmHWM")
    with torch.no_grad():  # first use: a lazily mapped checkpoint (transformers' mmap) is read only now
        n = sum(p.numel() for p in model.parameters())
        float(sum(p.float().sum().item() for p in model.parameters()))
    return {"rss_before_mb": before, "rss_after_mb": after, "vm_hwm_load_mb": hwm_load,
            "vm_hwm_after_use_mb": proc_status_mib("VmHWM"), "rss_after_use_mb": proc_status_mib("VmRSS"),
            "load_s": wall, "parameters": n, "class": type(model).__name__,
            "device": str(next(model.parameters()).device)}


def make_checkpoint(out: Path, hidden: int, layers: int, vocab: int, dtype: str) -> Path:
    import torch
    import transformers as tf

    from raysens.core.models import packaged_model_path

    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)  # one model.safetensors (~0.5 GB at the defaults) + config.json
    tf.AutoTokenizer.from_pretrained(str(packaged_model_path("minilm"))).save_pretrained(out)
    del model
    return out


def measure(variant: str, path: Path, device: str) -> dict:
    """One variant in a child process; the parent samples its RSS every 5 ms from its READY line."""
    return run_child("jobs.bench.load_rss:child", {"variant": variant, "path": str(path), "device": device},
                     sample_rss=True, every_s=0.005)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.load_rss", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variants", nargs="+", default=["new", "old_dir", "old_cached"])
    add_json_arg(ap)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raysens-load-rss-") as d:
        path = make_checkpoint(Path(d), a.hidden, a.layers, a.vocab, a.dtype)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        res = {"device": a.device, "checkpoint_dtype": a.dtype, "file_mb": round(size / 2**20, 1),
               "config": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "tie_word_embeddings": False},
               "variants": {}}
        for v in a.variants:
            r = measure(v, path, a.device)
            peak = max(r["vm_hwm_load_mb"], r["sampled_peak_mb"])
            use = r["vm_hwm_after_use_mb"]
            r.update(peak_mb=round(peak, 1), peak_over_file=round(peak * 2**20 / size, 3),
                     load_over_file=round((peak - r["rss_before_mb"]) * 2**20 / size, 3),
                     load_and_use_over_file=round((use - r["rss_before_mb"]) * 2**20 / size, 3))
            res["variants"][v] = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items()}
            log(f"{v}: peak {peak:.0f} MB, before load {r['rss_before_mb']:.0f} MB, "
                f"load/file {res['variants'][v]['load_over_file']}, "
                f"load+first use/file {res['variants'][v]['load_and_use_over_file']}, {r['load_s']:.1f} s", err=True)
    write_json(res, a.json, echo=True)
    return res


if __name__ == "__main__":
    main()

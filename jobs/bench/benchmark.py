"""raysens benchmark: the older tool's VJP loop (the "seed loop") against raysens, side by side.

Run by hand from the repository root, not in CI. Results and their interpretation are recorded in
``docs/benchmarks.md`` (engine) and ``docs/pipeline-benchmarks.md`` (pipeline). This module only dispatches;
each mode lives in its own module::

    # CPU (jobs/bench/cpu.py): real SmolLM2-135M and MiniLM-L6, seed loop vs hutchinson K=1; exact vs jacrev
    python -m jobs.bench.benchmark cpu                          # defaults: S=32, 2 timed rounds
    python -m jobs.bench.benchmark cpu --threads 2 --rounds 3 --json jobs/results/benchmark_cpu_2threads.json
    python -m jobs.bench.benchmark cpu --samples 4 --seq-len 32 --rounds 2 --json /tmp/bench_cpu.json

    # GPU (jobs/bench/gpu.py): random-weight Qwen2-1.5B shape, last layer strict fp32 and TF32 vs the seed loop,
    # then all 28 layers in forward / reverse / auto mode (TF32); no Ray, no install
    python -m jobs.bench.benchmark gpu --out $OUT               # writes $OUT/benchmark_gpu.json
    python -m jobs.bench.benchmark gpu --out /tmp/bench --batch 32 --seq-len 64 --seed-samples 2
    python -m jobs.bench.benchmark gpu --device cpu --tiny --reps 1 --seed-samples 1 --out /tmp/b   # smoke test

    # the distributed pipeline (jobs/bench/pipeline.py; the same as python -m jobs.bench.pipeline ...)
    python -m jobs.bench.benchmark pipeline overhead|memory|all [...]

    # many synthetic actors: throughput and parallel efficiency (jobs/bench/actors.py)
    python -m jobs.bench.benchmark actors scaling|driver [...]
    # precision bf16 vs fp32: speed (all layers) and the error it adds (jobs/bench/precision.py)
    python -m jobs.bench.benchmark precision [--models smollm2 minilm] [--parts speed,error,hutch]
    # corpus reads: time to first unit and peak RSS, 200 / 10k shuffled samples of 100k-10M rows (jobs/bench/corpus.py)
    python -m jobs.bench.benchmark corpus --dir /tmp/corpus-bench [--json jobs/results/corpus_reads.json]
    # run-directory bytes: 1k/10k/100k samples with and without compaction, partial formats (jobs/bench/rundir.py)
    python -m jobs.bench.benchmark rundir all --json jobs/results/rundir_bytes.json
    # manual vs vmap engine strategies (jobs/bench/strategies.py; = python -m jobs.bench.strategies ...)
    python -m jobs.bench.benchmark strategies [--models smollm2 minilm gpt2] [--layers -1 15]
    # the generic path (any model) vs the hand-written one at equal shapes; Gemma, Phi-3, Qwen3, OLMo-2,
    # GPT-NeoX on the generic path (jobs/bench/generic.py; = python -m jobs.bench.generic ...)
    python -m jobs.bench.benchmark generic [--parts llama families] [--blocks 30] [--modes forward reverse]

Without a mode, ``cpu`` is run (``python -m jobs.bench.benchmark --rounds 3`` = ``... cpu --rounds 3``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from jobs.harness import write_json


# the modes with their own arguments (``python -m jobs.bench.<mode>``), passed on unchanged
PASSED_ON = {"pipeline": "the distributed pipeline",
             "actors": "pipeline throughput with many synthetic actors",
             "strategies": "manual vs vmap engine strategies",
             "generic": "generic vs hand-written path at equal shapes",
             "modes": "forward vs reverse mode",
             "precision": "bf16 vs fp32 precision, speed and error",
             "corpus": "corpus reads, first unit and peak RSS",
             "rundir": "run-directory bytes, compaction and partial formats"}


def _parser() -> argparse.ArgumentParser:
    from . import cpu, gpu

    ap = argparse.ArgumentParser(prog="python -m jobs.bench.benchmark", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("::", 1)[1].split("\nWithout", 1)[0])
    sub = ap.add_subparsers(dest="mode")
    cpu.add_arguments(sub.add_parser("cpu", help="seed loop vs raysens on SmolLM2 and MiniLM; exact vs jacrev"))
    gpu.add_arguments(sub.add_parser("gpu", help="random-weight Qwen2-1.5B shape, strict fp32 and TF32"))
    for mode, what in PASSED_ON.items():
        sub.add_parser(mode, help=f"{what}: python -m jobs.bench.{mode} (arguments passed on)")
    return ap




def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in PASSED_ON:
        return importlib.import_module(f"jobs.bench.{argv[0]}").main(argv[1:])
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["cpu"] + argv  # no mode: cpu
    args = _parser().parse_args(argv)
    if args.mode == "cpu":
        from .cpu import cpu_main

        res = cpu_main(args)
        write_json(res, args.json)
    else:
        from .gpu import gpu_main

        res = gpu_main(args)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            write_json(res, out / "benchmark_gpu.json")
    return res


if __name__ == "__main__":
    main()

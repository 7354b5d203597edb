"""Corpus reads: time to first unit and peak memory of the driver and of a tokenize worker, for a few
shuffled samples out of large corpora, with the reads of issue 10 (``new``: row groups / line index /
memory map) and the whole-column reads they replaced (``old``, kept here privately), side by side.

Generates once, under ``--dir`` (streamed, constant memory): a 100k-row and a 10M-row Parquet file
(short random texts, row groups of 100k rows) and a 1M-line JSONL file. Every measurement runs in
fresh processes: the *driver* (row count + content identity + shuffled selection, as
``run/prepare.py: prepare`` does) and then a *tokenize worker* (the tokenizer loaded, then
``Corpus.texts`` + ``tokenize_unit`` for every unit of the selection, as ``backends/units.py`` does);
peak RSS from ``getrusage(RUSAGE_SELF).ru_maxrss``, and the worker's growth over its RSS once the
tokenizer is loaded (before any corpus read). ``new`` runs twice: a cold cache (digests and line index
computed: what a first run costs) and a warm one (every later run, every later worker on the node).
Time to first unit = driver + the worker's first unit (texts + tokenization).

From the repository root::

    python -m jobs.bench.corpus --dir /tmp/corpus-bench --repeats 2 --json jobs/results/corpus_reads.json
    python -m jobs.bench.corpus --dir /tmp/corpus-bench --corpora pq100k jsonl1m --samples 200 --impl new
    python -m jobs.bench.benchmark corpus --dir /tmp/corpus-bench     # the same, through the dispatcher
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from jobs.harness import log, maxrss_mib, run_child, write_json

CORPORA = {"pq100k": ("parquet", 100_000), "pq10m": ("parquet", 10_000_000), "jsonl1m": ("jsonl", 1_000_000)}
ROW_GROUP = 100_000

# ---------------------------------------------------------------------- corpus generation (streamed)
def _texts(rng: np.random.Generator, n: int, vocab: np.ndarray) -> list[str]:
    lens = rng.integers(6, 15, n)
    words = vocab[rng.integers(0, len(vocab), int(lens.sum()))].tolist()
    out, p = [], 0
    for k in lens.tolist():
        out.append(" ".join(words[p:p + k]))
        p += k
    return out


def _vocab(rng) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(letters[rng.integers(0, 26, int(rng.integers(2, 9)))]) for _ in range(4000)])


def corpus_path(d: Path, name: str) -> Path:
    kind, _ = CORPORA[name]
    return d / f"{name}.{'parquet' if kind == 'parquet' else 'jsonl'}"


def generate(d: Path, name: str) -> Path:
    """The corpus ``name`` under ``d``, written once (batches of 100k rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind, rows = CORPORA[name]
    path = corpus_path(d, name)
    if path.exists():
        return path
    d.mkdir(parents=True, exist_ok=True)
    t0, tmp, rng = time.perf_counter(), path.with_suffix(".tmp"), np.random.default_rng(rows)
    vocab = _vocab(rng)
    if kind == "parquet":
        schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
        with pq.ParquetWriter(tmp, schema) as w:
            for a in range(0, rows, ROW_GROUP):
                n = min(ROW_GROUP, rows - a)
                w.write_table(pa.table({"id": np.arange(a, a + n), "text": _texts(rng, n, vocab)}, schema=schema),
                              row_group_size=ROW_GROUP)
    else:
        with open(tmp, "w") as f:
            for a in range(0, rows, ROW_GROUP):
                f.writelines(json.dumps({"id": a + i, "text": t}) + "\n"
                             for i, t in enumerate(_texts(rng, min(ROW_GROUP, rows - a), vocab)))
    tmp.replace(path)
    log(f"generated {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return path


# ---------------------------------------------------------------------- the reads before issue 10 (reference)
def _old_driver(data) -> tuple[int, np.ndarray]:
    """Row count + identity as before: Parquet count_rows + every file's SHA-256; JSONL every line
    parsed and the records and the file hashed; selection from the int64 permutation."""
    from raysens.corpus.reader import Corpus
    from raysens.corpus.line_index import iter_lines

    c = Corpus(data)
    if c.kind == "parquet":
        n = c._parquet().count_rows()
    else:
        n, h = 0, hashlib.sha256()
        for line in iter_lines(*_local(c.source)):
            h.update(line + b"\n")
            if line.strip():
                json.loads(line.decode("utf-8"))
                n += 1
    hf = hashlib.sha256()
    with open(c.source, "rb") as f:
        while chunk := f.read(1 << 20):
            hf.update(chunk)
    ids = np.random.default_rng(data.shuffle_seed).permutation(n)[: data.limit]
    return n, np.sort(ids).astype(np.int64)


def _old_column(data) -> list:
    from raysens.corpus.reader import Corpus
    from raysens.corpus.line_index import iter_lines

    c = Corpus(data)
    if c.kind == "parquet":
        return c._parquet().to_table(columns=[c.column]).column(c.column).to_pylist()
    out, h = [], hashlib.sha256()
    for line in iter_lines(*_local(c.source)):
        h.update(line + b"\n")
        if line.strip():
            out.append(json.loads(line.decode("utf-8")).get(c.column))
    return out


def _local(path: str):
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), path


# ---------------------------------------------------------------------- one measurement (child processes)
def _data(path: str, samples: int):
    from raysens.config import DataConfig

    return DataConfig(source=path, limit=samples, shuffle=True, shuffle_seed=0)


def child_driver(args) -> dict:
    t0 = time.perf_counter()
    base = maxrss_mib()
    data = _data(args.path, args.samples)
    if args.impl == "old":
        n, ids = _old_driver(data)
    else:
        from raysens.corpus.reader import Corpus

        c = Corpus(data)
        n = c.num_rows()
        c.identity()
        ids = c.select(n)
    np.save(args.ids, ids)
    return {"rows": n, "selected": len(ids), "driver_s": time.perf_counter() - t0, "driver_rss_mib": maxrss_mib(),
            "driver_rss_at_start_mib": base}


def child_worker(args) -> dict:
    import pyarrow.dataset  # noqa: F401  (imports both implementations need: not counted as reads)
    import pyarrow.parquet  # noqa: F401

    import raysens.corpus.reader  # noqa: F401
    from raysens.backends.units import get_tokenizer, tokenize_unit

    tok = get_tokenizer(args.model, False)
    tok(["warm up"])
    base = maxrss_mib()
    ids = np.load(args.ids)
    units = [ids[i:i + args.batch] for i in range(0, len(ids), args.batch)]
    data = _data(args.path, args.samples)
    t0 = time.perf_counter()
    first, kept, digest = None, 0, hashlib.sha256()
    if args.impl == "old":
        col = None
        texts_of = lambda u: [col[int(i)] for i in u]  # noqa: E731
    else:
        from raysens.corpus.reader import Corpus

        corpus = Corpus(data)
        texts_of = corpus.texts
    for u in units:
        if args.impl == "old" and col is None:
            col = _old_column(data)  # loaded once per process, as before
        texts = texts_of(u)
        digest.update(json.dumps(texts).encode())
        kept += len(tokenize_unit(u, texts, tok, 32, 1)["run_ids"])
        if first is None:
            first = time.perf_counter() - t0
    return {"worker_first_unit_s": first, "worker_all_units_s": time.perf_counter() - t0, "units": len(units),
            "tokenized": kept, "worker_rss_mib": maxrss_mib(), "worker_rss_before_reads_mib": base,
            "worker_growth_mib": maxrss_mib() - base, "texts_sha256": digest.hexdigest()}


def child(spec: dict) -> dict:
    """Child-process body (``jobs.harness.run_child``): the driver's or the worker's part (``spec["mode"]``)."""
    args = SimpleNamespace(**spec)
    return child_driver(args) if args.mode == "driver" else child_worker(args)


def _child(mode: str, path: Path, samples: int, impl: str, args, env: dict, ids: Path) -> dict:
    spec = {"mode": mode, "path": str(path), "samples": samples, "impl": impl, "batch": args.batch,
            "model": args.model, "ids": str(ids)}
    return run_child("jobs.bench.corpus:child", spec, env=env, timeout=3600)


def measure(args) -> dict:
    d = Path(args.dir)
    results = []
    for name in args.corpora:
        path = generate(d, name)
        for samples in args.samples:
            for impl in args.impl:
                phases = ["cold", "warm"] if impl == "new" else ["-"]
                for phase in phases:
                    runs = []
                    for _ in range(args.repeats):
                        cache = d / "cache" / name
                        if phase == "cold":
                            shutil.rmtree(cache, ignore_errors=True)
                        env = {**os.environ, "RAYSENS_CORPUS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                               "TRANSFORMERS_OFFLINE": "1"}
                        ids = d / f"ids-{name}-{samples}-{impl}.npy"
                        r = _child("driver", path, samples, impl, args, env, ids)
                        r.update(_child("worker", path, samples, impl, args, env, ids))
                        r["first_unit_s"] = r["driver_s"] + r["worker_first_unit_s"]
                        ids.unlink()
                        runs.append(r)
                    # under contention: the fastest time and the largest memory of the repeats
                    r = {"corpus": name, "rows": CORPORA[name][1], "samples": samples, "impl": impl, "cache": phase,
                         "repeats": len(runs),
                         **{k: (min if k.endswith("_s") else max)(x[k] for x in runs) for k in runs[0]
                            if isinstance(runs[0][k], (int, float))},
                         "texts_sha256": runs[0]["texts_sha256"],
                         "same_texts_every_repeat": len({x["texts_sha256"] for x in runs}) == 1,
                         "loadavg_1min": round(os.getloadavg()[0], 1)}
                    results.append(r)
                    log(f"{name:8s} {samples:6d} {impl:3s} {phase:4s}  first unit {r['first_unit_s']:7.2f} s "
                        f"(driver {r['driver_s']:6.2f} s)  driver {r['driver_rss_mib']:6.0f} MiB  worker "
                        f"{r['worker_rss_mib']:6.0f} MiB (+{r['worker_growth_mib']:5.0f})  all units "
                        f"{r['worker_all_units_s']:6.2f} s")
    same = {}
    for r in results:  # old and new read the same texts for the same selection
        same.setdefault((r["corpus"], r["samples"]), set()).add(r["texts_sha256"])
    return {"what": "corpus reads, issue 10", "row_group_rows": ROW_GROUP, "batch": args.batch, "model": args.model,
            "same_texts_old_vs_new": all(len(v) == 1 for v in same.values()) and all(
                r["same_texts_every_repeat"] for r in results),
            "corpus_mib": {n: round(corpus_path(d, n).stat().st_size / 2**20, 1) for n in args.corpora},
            "results": results}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench.corpus", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("::", 1)[1])
    ap.add_argument("--dir", default="/tmp/corpus-bench", help="where the corpora are generated (once) and cached")
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--samples", nargs="+", type=int, default=[200, 10_000])
    ap.add_argument("--impl", nargs="+", default=["new", "old"], choices=["new", "old"])
    ap.add_argument("--batch", type=int, default=16, help="samples per unit (cluster.batch_size)")
    ap.add_argument("--model", default="random:tiny-llama", help="whose tokenizer the worker loads")
    ap.add_argument("--repeats", type=int, default=1, help="measure each case N times: fastest time, largest RSS")
    ap.add_argument("--json", help="write the results here")
    return ap


def main(argv=None):
    args = _parser().parse_args(argv)
    res = measure(args)
    res["command"] = "python -m jobs.bench.corpus " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(res, args.json)
    return res


if __name__ == "__main__":
    main()

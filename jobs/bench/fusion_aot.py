"""Probe for issue 30's next step: one fused kernel (the RMSNorm tangent) through ``torch.export`` +
AOTInductor (``aoti_compile_and_package``: no dynamo at call time) against the same kernel through
``fusion._Compiled`` (dynamo) and eager, on SmolLM2 shapes ``[chunk 2, batch 8, P 16, 576]``.

    python -m jobs.bench.fusion_aot                  # 1 thread, 200 alternating calls each
    python -m jobs.bench.fusion_aot --threads 2

Prints the AOT compile time, each variant's distance from eager and its median µs per call. The
exported sizes are symbolic with a minimum of 2 (a size-1 dimension needs its own export, as it needs
its own key in ``_Compiled``). Runs in this process with a temporary package path. No Ray.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    from raysens.core.stacks import fusion
    from raysens.core.stacks.llama_tangent import _norm_tangent

    ap = argparse.ArgumentParser(prog="python -m jobs.bench.fusion_aot", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    c, b, p, d = 2, 8, 16, 576
    dx, xn, r, w = (torch.randn(c, b, p, d, generator=g), torch.randn(b, p, d, generator=g),
                    torch.rand(b, p, generator=g), torch.randn(d, generator=g))

    class Rms(torch.nn.Module):
        def forward(self, dx, xn, r, w):
            return fusion._rms_fused(dx, xn, r, w, torch.float32)

    dims = {n: torch.export.Dim(n, min=2, max=1 << 16) for n in ("C", "B", "P", "D")}
    shapes = ({0: dims["C"], 1: dims["B"], 2: dims["P"], 3: dims["D"]}, {0: dims["B"], 1: dims["P"], 2: dims["D"]},
              {0: dims["B"], 1: dims["P"]}, {0: dims["D"]})
    with tempfile.TemporaryDirectory(prefix="raysens-aot-") as tmp:
        t0 = time.perf_counter()
        ep = torch.export.export(Rms(), (dx, xn, r, w), dynamic_shapes=shapes)
        aot = torch._inductor.aoti_load_package(
            torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/rms.pt2"))
        print(f"AOT compile (export + AOTInductor, cold unless the inductor cache has it): "
              f"{time.perf_counter() - t0:.1f} s")
        k = fusion._Compiled(fusion._rms_fused)
        variants = {"eager": lambda: _norm_tangent(dx, xn, r.unsqueeze(-1), w),
                    "dynamo": lambda: k(dx, xn, r, w, torch.float32), "aot": lambda: aot(dx, xn, r, w)}
        ts: dict = {n: [] for n in variants}
        with torch.no_grad():
            ref = variants["eager"]()
            for n, f in variants.items():
                o = f()
                o = o[0] if isinstance(o, (list, tuple)) else o
                print(f"{n:7s} distance from eager {float((o - ref).norm() / ref.norm()):.1e}")
            for _ in range(args.reps):
                for n, f in variants.items():
                    t0 = time.perf_counter()
                    f()
                    ts[n].append(time.perf_counter() - t0)
    e = statistics.median(ts["eager"])
    for n, v in ts.items():
        print(f"{n:7s} {statistics.median(v) * 1e6:7.1f} µs per call ({e / statistics.median(v):.2f}× eager), "
              f"{args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

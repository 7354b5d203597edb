"""Run the ``gpu`` tests without pytest (the lent GPU machines may lack it): every ``test_*`` function
of ``tests/gpu/test_*.py``, one line per test, exit status 1 if any failed. The repository root
(``raysens``) and ``tests/unit`` (``refs``) come from ``PYTHONPATH``, as pytest's ``pythonpath`` gives
them (``jobs/device_check.sh`` sets it):

    PYTHONPATH=.:tests/unit python tests/gpu/run_plain.py [name-substring ...]
"""

from __future__ import annotations

import importlib.util
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    import torch

    try:
        import raysens  # noqa: F401
        import refs  # noqa: F401
    except ImportError as e:
        print(f"run_plain: {e}: run from the repository root with PYTHONPATH=.:tests/unit")
        return 2

    if not torch.cuda.is_available():
        print("SKIP all: no CUDA device")
        return 0
    failed = 0
    for path in sorted(HERE.glob("test_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name in sorted(n for n in vars(mod) if n.startswith("test_")):
            if argv and not any(a in name for a in argv):
                continue
            t0 = time.perf_counter()
            try:
                getattr(mod, name)()
                print(f"PASS {path.name}::{name} ({time.perf_counter() - t0:.1f} s)", flush=True)
            except Exception:  # noqa: BLE001 - report every failure, run the rest
                failed += 1
                print(f"FAIL {path.name}::{name} ({time.perf_counter() - t0:.1f} s)", flush=True)
                traceback.print_exc()
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

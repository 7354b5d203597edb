"""Writing ``.npz`` archives fast: zlib level 1 instead of ``np.savez_compressed``'s default level.

``np.load`` reads the result as any ``.npz``; only the bytes differ (a partial's or checkpoint's file
name hashes its bytes, so names change with the level, contents never). Measured (docs/benchmarks.md,
issue 18): a 28-layer S = 64 partial (23.8 MB of arrays) compresses to 4.78 MB in 0.19 s CPU at
level 1 against 4.36 MB in 0.94 s at the default level; an S = 512 stats file: 18.5 MB in 0.59 s
against 17.3 MB in 1.73 s. numpy only.
"""

from __future__ import annotations

import io
import zipfile
from typing import Mapping

import numpy as np


def savez_fast(buf, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` (name -> array, no pickles) to the binary file object ``buf`` as an npz."""
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(v), allow_pickle=False)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``savez_fast`` into memory."""
    buf = io.BytesIO()
    savez_fast(buf, arrays)
    return buf.getvalue()

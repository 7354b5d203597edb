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


_CHUNK = 16 * 1024 ** 2  # bytes per write of an array's data: np.lib.format.write_array's buffer


def _write(f, a: np.ndarray) -> None:
    """``np.lib.format.write_array(f, a, allow_pickle=False)``, byte for byte, without its copy of the
    data: a C-contiguous array's memory goes to the zip stream in the same 16 MiB pieces (so zlib
    sees the same input), through views; zipfile's crc32 and zlib's deflate release the GIL on
    them, so an encoding on a background thread holds the GIL only between pieces
    (``tobytes`` copied every piece into fresh pages with the GIL held, docs/DESIGN.md §4.2)."""
    header = getattr(np.lib.format, "_write_array_header", None)
    legacy = getattr(type(a.dtype), "_legacy", True)
    if header is None or not a.flags.c_contiguous or a.dtype.hasobject or not legacy or a.itemsize == 0:
        np.lib.format.write_array(f, a, allow_pickle=False)
        return
    header(f, np.lib.format.header_data_from_array_1_0(a), None)
    data = memoryview(a.reshape(-1).view(np.uint8))
    step = max(_CHUNK // a.itemsize, 1) * a.itemsize
    for i in range(0, data.nbytes, step):
        f.write(data[i:i + step])


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The bytes of an npz of ``arrays`` (name -> array, no pickles) at zlib level 1: partials,
    checkpoints and stats files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for k, v in arrays.items():
            with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                _write(f, np.asanyarray(v))
    return buf.getvalue()

"""An actor's shipment table (``raysens.backends.shipments``, issue 31): the payload column is
``large_binary``, so a state over Arrow's 2 GiB ``binary`` limit ships (one ~2.1 GiB buffer). No Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysens.backends.shipments import shipment_table


def _row(payload) -> dict:
    return {"job": 0, "units": [0, 8], "samples": 16, "payload": payload, "node": "n", "actor": "a", "gpus": ["0"]}


def test_small_rows_round_trip():
    t = shipment_table([_row(b"abc"), _row(b"")])
    assert t.schema.field("payload").type == pa.large_binary()
    assert t.to_pylist()[0] == {**_row(b"abc"), "error": None} and t.num_rows == 2  # no error: null
    assert shipment_table([]).num_rows == 0


def test_a_state_over_2_gib_ships():
    n = 2 ** 31 + 2 ** 26  # 2.06 GiB: past binary's 2 GiB - 1
    buf = np.zeros(n, np.uint8)
    marks = [0, 2 ** 31 - 1, 2 ** 31, n - 1]
    buf[marks] = [1, 2, 3, 4]  # one byte each side of the 32-bit offset limit
    payload = buf.tobytes()
    del buf
    t = shipment_table([_row(payload)])
    del payload
    col = t.column("payload").chunk(0)
    data = col.buffers()[2]  # the values, read in place (no second copy of 2 GiB)
    offsets = np.frombuffer(col.buffers()[1], np.int64, count=2)  # 64-bit offsets
    assert offsets[1] - offsets[0] == n and data.size >= n
    view = np.frombuffer(data, np.uint8, count=n, offset=int(offsets[0]))
    assert view[marks].tolist() == [1, 2, 3, 4] and int(view.sum(dtype=np.int64)) == 10

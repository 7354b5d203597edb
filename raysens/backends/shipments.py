"""What an actor of the Ray pool returns (``shipment_table``, ``error_row``), the tokenize step
that carries its errors (``tokenize_carrying``) and the pass's unit tracker (``StartedUnits``, run
as a Ray actor by ``ray_pool``). No Ray import."""

from __future__ import annotations


SHIPMENT_SCHEMA = (("job", "int64"), ("units", "list<int64>"), ("samples", "int64"), ("payload", "large_binary"),
                   ("node", "string"), ("actor", "string"), ("gpus", "list<string>"), ("error", "large_binary"))


def shipment_table(rows: list[dict]):
    """The rows an actor returns as one Arrow table. ``payload`` is ``large_binary`` (64-bit offsets):
    an S = 2048 state is ~6 GB compressed, past ``binary``'s 2 GiB. ``error`` is null but on an error
    row (``error_row``), which carries the error the driver raises (``backends.errors``)."""
    import pyarrow as pa

    types = {"int64": pa.int64(), "list<int64>": pa.list_(pa.int64()), "large_binary": pa.large_binary(),
             "string": pa.string(), "list<string>": pa.list_(pa.string())}
    return pa.Table.from_pylist(rows, schema=pa.schema([(k, types[t]) for k, t in SHIPMENT_SCHEMA]))


def error_row(blob: bytes) -> dict:
    """The row that carries a worker's error to the driver (``errors.carried_bytes``): no units."""
    return {"job": -1, "units": [], "samples": 0, "payload": b"", "node": "", "actor": "", "gpus": [], "error": blob}


def tokenize_carrying(batch, **kwargs):
    """``units.tokenize_batch`` plus an ``error`` column (null). An error is not raised (Ray Data's
    wrapper would lose its type, ``errors.py``) but returned in a one-row table (``unit`` -2: neither
    a unit nor a flush marker) that the actor passes on to the driver."""
    import pyarrow as pa

    from .errors import carried_bytes
    from .units import tokenize_batch, tokenized_schema

    try:
        table = tokenize_batch(batch, **kwargs)
        return table.append_column("error", pa.nulls(len(table), pa.large_binary()))
    except Exception as exc:  # noqa: BLE001 - carried to the driver as data (errors.py)
        schema = tokenized_schema()
        row = {f.name: ([] if pa.types.is_list(f.type) else None) for f in schema}
        row.update(job=0, unit=-2, ship=False, error=carried_bytes(exc))
        return pa.Table.from_pylist([row], schema=schema.append(pa.field("error", pa.large_binary())))


class StartedUnits:
    """The pass's unit tracker (a Ray actor): which units have started, so an actor knows when it will
    get no more (every unit started) and ships at once."""

    def __init__(self, total: int):
        self.total, self.keys = total, set()

    def start(self, key) -> None:
        self.keys.add(tuple(key))

    def all_started(self) -> bool:
        return len(self.keys) >= self.total

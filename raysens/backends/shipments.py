"""What an actor of the Ray pool returns (``shipment_table``) and the pass's unit tracker
(``StartedUnits``, run as a Ray actor by ``ray_pool``). No Ray import."""

from __future__ import annotations


SHIPMENT_SCHEMA = (("job", "int64"), ("units", "list<int64>"), ("samples", "int64"), ("payload", "large_binary"),
                   ("node", "string"), ("actor", "string"), ("gpus", "list<string>"))


def shipment_table(rows: list[dict]):
    """The rows an actor returns as one Arrow table. ``payload`` is ``large_binary`` (64-bit offsets):
    an S = 2048 state is ~6 GB compressed, past ``binary``'s 2 GiB."""
    import pyarrow as pa

    types = {"int64": pa.int64(), "list<int64>": pa.list_(pa.int64()), "large_binary": pa.large_binary(),
             "string": pa.string(), "list<string>": pa.list_(pa.string())}
    return pa.Table.from_pylist(rows, schema=pa.schema([(k, types[t]) for k, t in SHIPMENT_SCHEMA]))


class StartedUnits:
    """The pass's unit tracker (a Ray actor): which units have started, so an actor knows when it will
    get no more (every unit started) and ships at once."""

    def __init__(self, total: int):
        self.total, self.keys = total, set()

    def start(self, key) -> None:
        self.keys.add(tuple(key))

    def all_started(self) -> bool:
        return len(self.keys) >= self.total

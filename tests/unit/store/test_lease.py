"""Issue 13 item 14: the run-directory lease (heartbeat, refusal naming the holder, staleness)."""

from __future__ import annotations

import json
import socket
import time

import pyarrow.fs as pafs
import pytest

from raysens.store import lease as lease_mod
from raysens.store.lease import Lease, LeaseError


def _lease(tmp_path, where="run"):
    return Lease(pafs.LocalFileSystem(), str(tmp_path), where)


def test_heartbeat_refreshes_and_release_removes_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.1)
    a = _lease(tmp_path)
    a.acquire()
    rec = json.loads((tmp_path / "lease.json").read_text())
    assert rec["pid"] > 0 and rec["host"] == socket.gethostname() and rec["token"] == a.token
    time.sleep(0.5)
    assert json.loads((tmp_path / "lease.json").read_text())["heartbeat"] > rec["heartbeat"]
    b = _lease(tmp_path)
    with pytest.raises(LeaseError, match=r"in use by another raysens driver \(pid \d+ on host .*last heartbeat"):
        b.acquire()
    a.release()
    assert not (tmp_path / "lease.json").exists()
    with b:
        assert (tmp_path / "lease.json").exists()
    assert not (tmp_path / "lease.json").exists()


def test_stale_or_dead_or_unreadable_leases_are_free(tmp_path):
    p = tmp_path / "lease.json"
    base = {"owner": "x", "host": "elsewhere", "pid": 1, "token": "t", "heartbeat": time.time(), "stale_after_s": 60}
    p.write_text(json.dumps(base))
    assert _lease(tmp_path).holder()["host"] == "elsewhere"
    p.write_text(json.dumps({**base, "heartbeat": time.time() - 120}))
    assert _lease(tmp_path).holder() is None
    p.write_text(json.dumps({**base, "host": socket.gethostname(), "pid": 2 ** 22 + 11}))
    assert _lease(tmp_path).holder() is None
    p.write_text("garbage")
    assert _lease(tmp_path).holder() is None

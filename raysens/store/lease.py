"""A run directory's lease: one driver at a time computes into a run directory.

``<run>/lease.json`` holds ``{owner, host, pid, token, acquired, heartbeat, stale_after_s}``; it is
written with the atomic ``fs.write_bytes`` (no ``flock``, so it works on object stores too) and its
``heartbeat`` (Unix time) is refreshed every ``HEARTBEAT_S`` seconds by a daemon thread while the
driver holds it. A second driver is **refused** (it does not wait) with a message naming the holder,
unless the lease is stale: its heartbeat is older than ``STALE_S`` seconds, or its holder is a
process of this host that no longer exists (a killed driver on the same machine does not block a
rerun). Released (deleted) when the driver is done, whatever the outcome.

Acquisition writes the lease and reads it back: on a filesystem without conditional writes two
drivers starting within the same instant could both write, and the read-back makes the later
writer's token win; the other one is refused. pyarrow only.
"""

from __future__ import annotations

import getpass
import json
import os
import posixpath
import socket
import threading
import time

import pyarrow.fs as pafs

from ..errors import RaysensError
from .fs import exists, read_bytes, write_bytes

LEASE = "lease.json"
HEARTBEAT_S = 10.0  # seconds between heartbeats
STALE_S = 60.0  # a lease whose heartbeat is older than this is free


class LeaseError(RaysensError, RuntimeError):
    """Another driver holds the run directory's lease."""


def _owner() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lease:
    """The lease of one run directory (``acquire()`` / ``release()``; a context manager too)."""

    def __init__(self, fs: pafs.FileSystem, base: str, where: str):
        self.fs, self.path, self.where = fs, posixpath.join(base, LEASE), where
        self.token = os.urandom(8).hex()
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record: dict = {}

    def holder(self) -> dict | None:
        """The current lease record if it is live (not stale), else None."""
        if not exists(self.fs, self.path):
            return None
        try:
            rec = json.loads(read_bytes(self.fs, self.path))
            age = time.time() - float(rec["heartbeat"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable lease: treat as free (it is rewritten below)
        if rec.get("token") == self.token:
            return None
        if age > float(rec.get("stale_after_s", STALE_S)):
            return None
        if rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", -1))):
            return None
        return {**rec, "age_s": round(age, 1)}

    def acquire(self) -> None:
        other = self.holder()
        if other is not None:
            raise LeaseError(
                f"output directory {self.where!r} is in use by another raysens driver (pid {other.get('pid')} on "
                f"host {other.get('host')}, user {other.get('owner')}, last heartbeat {other['age_s']}s ago); "
                f"wait until it finishes, or rerun when its lease goes stale ({other.get('stale_after_s', STALE_S):.0f}s "
                "without a heartbeat) if it died (nothing was changed)")
        now = time.time()
        self._record = {"owner": _owner(), "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                        "acquired": now, "heartbeat": now, "stale_after_s": STALE_S}
        self._write()
        try:
            back = json.loads(read_bytes(self.fs, self.path))
        except (OSError, ValueError):
            back = {}
        if back.get("token") != self.token:
            raise LeaseError(f"output directory {self.where!r} was claimed by another raysens driver at the same "
                             f"moment (pid {back.get('pid')} on host {back.get('host')}); nothing was changed")
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="raysens-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        write_bytes(self.fs, self.path, json.dumps(self._record, indent=1).encode())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._record["heartbeat"] = time.time()
            try:
                self._write()
            except Exception:  # a transient storage error: the next beat retries
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.held = False
        try:
            if exists(self.fs, self.path):
                rec = json.loads(read_bytes(self.fs, self.path))
                if rec.get("token") == self.token:
                    self.fs.delete_file(self.path)
        except (OSError, ValueError):
            pass

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

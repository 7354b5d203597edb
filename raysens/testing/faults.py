"""Fault injection for tests: the one place where raysens simulates crashes.

Production code calls one hook at each of six points; every hook is a no-op unless a test armed
it through an environment variable (environment variables reach subprocesses, ``ray job submit``
drivers and, through the driver, the Ray actors):

| hook (called by)                                   | armed by                                   | effect |
|----------------------------------------------------|--------------------------------------------|--------|
| ``partial_persisted(n)`` (``store.rundir.RunDir.add``, after the n-th partial of this invocation is written) | ``RAYSENS_TEST_DRIVER_EXIT_AFTER_UNITS=N`` | the driver process exits at once (``os._exit(3)``): a killed driver |
| ``unit_arrived(n)`` (``run.runner.Runner``, after the n-th unit of this invocation arrived and was persisted) | ``RAYSENS_TEST_INTERRUPT_AFTER_UNITS=N``   | raises ``SimulatedInterrupt`` (a ``BaseException``, like Ctrl-C) |
|                                                    | ``RAYSENS_TEST_UNIT_DELAY_S=T``            | sleeps T seconds after each unit (a slow run: time for a test to send SIGINT / SIGTERM) |
| ``actor_unit_start(units_done, settings)`` (``backends.ray_pool.SensitivityActor``, before each unit) | ``RAYSENS_TEST_KILL_AFTER_UNITS=N`` and ``RAYSENS_TEST_KILL_MARKER=path`` | after N units the actor process exits (``os._exit(17)``) in its next unit, once per marker file |
|                                                    | ``RAYSENS_TEST_ACTOR_UNIT_DELAY_S=T``      | the actor sleeps T seconds before each unit (units as slow as real ones: a test that needs every actor to get work) |
| ``planted_values(settings, sample_ids, values)`` (``backends.units.UnitWorker.process``, after the engine) | ``RAYSENS_TEST_SCALE_SAMPLE=ID:FACTOR`` | sample ``ID``'s maps (every layer) are multiplied by ``FACTOR``: a planted outlier sample |
| ``merge_task_start(settings)`` (``backends.merges``, a tree-of-merges task, before it merges) | ``RAYSENS_TEST_MERGE_FAULT=hang:S:MARKER[:N]`` / ``exit:MARKER`` | the first N tasks to create ``MARKER.0``… sleep S seconds (hung), or the first exits its worker (``os._exit(5)``) |
| ``compaction_step(step, i)`` (``store.compaction.Compaction._compact``: ``folded`` before the checkpoint write, ``written`` after it, ``old_deleted`` after the previous checkpoint's deletion, ``deleted`` after the i-th folded partial's deletion) | ``RAYSENS_TEST_COMPACT_CRASH=STEP[:I][:K]`` | raises ``SimulatedInterrupt`` at that step (``deleted:I``: after the I-th deletion) of the K-th compaction of the process (default 1) |
|                                                    | ``RAYSENS_TEST_COMPACT_EXIT=STEP[:I][:K]``  | the process exits there (``os._exit(4)``): a killed driver |

The actor hook's settings are read on the driver (``actor_settings()``) and passed to the actors as
a constructor argument, so they do not depend on the environment Ray gives its workers; so are the
planted outlier's (``planted_settings()``, passed to every ``UnitWorker``) and the merge tasks'
(``merge_settings()``, an argument of every task).
"""

from __future__ import annotations

import os

DRIVER_EXIT = "RAYSENS_TEST_DRIVER_EXIT_AFTER_UNITS"
INTERRUPT = "RAYSENS_TEST_INTERRUPT_AFTER_UNITS"
UNIT_DELAY = "RAYSENS_TEST_UNIT_DELAY_S"
ACTOR_KILL = "RAYSENS_TEST_KILL_AFTER_UNITS"
ACTOR_MARKER = "RAYSENS_TEST_KILL_MARKER"
ACTOR_DELAY = "RAYSENS_TEST_ACTOR_UNIT_DELAY_S"


class SimulatedInterrupt(BaseException):
    """Raised by ``unit_arrived`` when armed (behaves like a KeyboardInterrupt)."""


def _armed(name: str) -> int:
    return int(os.environ.get(name, "0") or 0)


def _seconds(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def partial_persisted(n_written: int) -> None:
    """Driver: the ``n_written``-th partial of this invocation is on disk."""
    after = _armed(DRIVER_EXIT)
    if after and n_written >= after:
        print(f"[raysens] {DRIVER_EXIT}={after}: driver exits now", flush=True)
        os._exit(3)


def unit_arrived(n_units: int) -> None:
    """Runner: ``n_units`` units have arrived (and were persisted) in this invocation."""
    after = _armed(INTERRUPT)
    if after and n_units >= after:
        raise SimulatedInterrupt(f"test hook: interrupted after {n_units} units")
    delay = _seconds(UNIT_DELAY)
    if delay > 0:
        import time

        time.sleep(delay)


def actor_settings() -> dict:
    """Driver side: the actor hook's settings, passed to every actor (empty unless armed)."""
    after, marker = _armed(ACTOR_KILL), os.environ.get(ACTOR_MARKER, "")
    out = {"kill_after": after, "kill_marker": marker} if after and marker else {}
    delay = _seconds(ACTOR_DELAY)
    return {**out, "delay_s": delay} if delay > 0 else out


def actor_unit_start(units_done: int, settings: dict) -> None:
    """Actor: about to compute a unit after ``units_done`` others."""
    if settings.get("delay_s"):
        import time

        time.sleep(settings["delay_s"])
    if "kill_after" not in settings or units_done < settings["kill_after"]:
        return
    try:
        fd = os.open(settings["kill_marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # this marker already killed an actor: the restarted one carries on
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    os._exit(17)


MERGE_FAULT = "RAYSENS_TEST_MERGE_FAULT"


def merge_settings() -> dict:
    """Driver side: the tree-of-merges hook's settings (``RAYSENS_TEST_MERGE_FAULT``:
    ``hang:SECONDS:MARKER[:N]`` — the first N merge tasks to start (default 1) sleep SECONDS; ``exit:MARKER``
    — the first one exits its worker process, ``os._exit(5)``), passed to every merge task as an argument
    (empty unless armed)."""
    raw = os.environ.get(MERGE_FAULT, "")
    if not raw:
        return {}
    kind, _, rest = raw.partition(":")
    if kind == "hang":
        s, _, rest = rest.partition(":")
        marker, _, n = rest.partition(":")
        return {"kind": "hang", "s": float(s), "marker": marker, "n": int(n or 1)}
    return {"kind": "exit", "marker": rest, "n": 1}


def merge_task_start(settings: dict) -> None:
    """A merge task (``backends.merges``) starts: the first ``n`` tasks to get a marker
    (``MARKER.0``, ``MARKER.1``, …, created exclusively) hang or exit; later ones (the retries) carry on."""
    if not settings:
        return
    for i in range(settings["n"]):
        try:
            os.close(os.open(f"{settings['marker']}.{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        if settings["kind"] == "exit":
            os._exit(5)
        import time

        time.sleep(settings["s"])
        return


COMPACT_CRASH = "RAYSENS_TEST_COMPACT_CRASH"
COMPACT_EXIT = "RAYSENS_TEST_COMPACT_EXIT"
_compactions = {"n": 0}  # compactions that reached step "folded" in this process


def compaction_step(step: str, i: int = 0) -> None:
    """Driver: compaction reached ``step`` (``folded``, ``written``, ``old_deleted``, ``deleted`` after
    the ``i``-th partial deletion)."""
    if step == "folded":
        _compactions["n"] += 1
    for var in (COMPACT_CRASH, COMPACT_EXIT):
        raw = os.environ.get(var, "")
        if not raw:
            continue
        want, *rest = raw.split(":")
        at = int(rest[0]) if rest and rest[0] else 0
        nth = int(rest[1]) if len(rest) > 1 else 1
        if step == want and at == i and _compactions["n"] == nth:
            if var == COMPACT_EXIT:
                print(f"[raysens] {var}={raw}: driver exits now", flush=True)
                os._exit(4)
            raise SimulatedInterrupt(f"test hook: crashed at compaction step {step}" + (f" {i}" if i else ""))


PLANT = "RAYSENS_TEST_SCALE_SAMPLE"


def planted_settings() -> dict:
    """Driver side: ``{"sample_id": ID, "factor": F}`` from ``RAYSENS_TEST_SCALE_SAMPLE=ID:F`` (empty unless armed)."""
    raw = os.environ.get(PLANT, "")
    if not raw:
        return {}
    sid, factor = raw.split(":")
    return {"sample_id": int(sid), "factor": float(factor)}


def planted_values(settings: dict, sample_ids, values: dict) -> dict:
    """Worker: ``values`` (layer -> ``[batch, S, S]``, rows in ``sample_ids`` order) with the planted
    sample's maps multiplied by the factor; unchanged (the same objects) unless armed and present."""
    if not settings or settings["sample_id"] not in [int(i) for i in sample_ids]:
        return values
    r = [int(i) for i in sample_ids].index(settings["sample_id"])
    out = {}
    for L, v in values.items():
        v = v.copy()
        v[r] = v[r] * settings["factor"]
        out[L] = v
    return out

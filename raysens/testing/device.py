"""Test-only device override: ``RAYSENS_TEST_DEVICE_OVERRIDE=cpu`` makes a Ray actor that was given a
GPU compute on the CPU, so the GPU mode (actors requesting and getting one GPU each, the manifest,
TF32 accepted) is tested on a CPU machine that declares GPUs to Ray (``ray.init(num_gpus=2)``).

Read on the driver (``device_override()``) and passed to the actors as a constructor argument, like
``faults.actor_settings()``. ``tf32`` needs CUDA, so an overridden actor runs its ``fp32``
equivalent (TF32 only changes how CUDA multiplies; on the CPU the two are the same computation).
Empty in production."""

from __future__ import annotations

import os

DEVICE_OVERRIDE = "RAYSENS_TEST_DEVICE_OVERRIDE"


def device_override() -> str | None:
    """Driver side: the device every actor computes on instead of its own (None unless armed)."""
    return os.environ.get(DEVICE_OVERRIDE, "").strip() or None


def apply(worker_kwargs: list[dict], device: str | None) -> list[dict]:
    """Actor side: ``UnitWorker`` arguments with ``device`` (and fp32 for tf32) when armed."""
    if not device:
        return worker_kwargs
    out = []
    for kw in worker_kwargs:
        sens = dict(kw["sensitivity"])
        if sens.get("precision") == "tf32" and not device.startswith("cuda"):
            sens["precision"] = "fp32"
        out.append({**kw, "device": device, "sensitivity": sens})
    return out

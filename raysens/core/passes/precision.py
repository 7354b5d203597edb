"""``SensitivityConfig.precision`` at run time (docs/DESIGN.md §1.12): the device check, the TF32
switch around a ``compute`` call, the autocast region of the generic (autograd) paths and the
compute dtype of the hand-written stacks.

- ``fp32``: nothing changes (every context here is a no-op, every cast returns its input).
- ``bf16``: the hand-written stacks keep their shared forward, norms and softmax statistics in
  float32 and run the GEMMs of the tangent/cotangent passes in bfloat16 (float32 accumulation) on
  bf16 weight copies made once per stack (``ManualStack.use_dtype``); the generic paths run under
  ``torch.autocast(dtype=bfloat16)`` (autocast converts the frozen weights per call; the residual
  stream stays float32 where the model adds in float32). The squared norms are taken in float32
  of the tangents/cotangents and summed in float64 (``forward.accumulate_forward``,
  ``cotangents.accumulate``).
- ``tf32``: CUDA only; float32 matrix products on TF32 tensor cores inside ``compute`` (the global
  flag is restored afterwards).

Torch only.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..options import Precision

# bf16's documented bounds: the relative Frobenius distance of an exact map (or of a Hutchinson estimate
# with the same probes) from its fp32 value, per layer (docs/DESIGN.md §1.12, measured in docs/benchmarks.md).
# Hand-written stacks: float32 forward, bf16 tangent/cotangent GEMMs.
BF16_MAP_BOUND = 2e-2
# The generic path under autocast also runs the forward's GEMMs in bf16 (its activations, hence the
# Jacobian itself, are rounded), so its error is ~3-5x the hand-written paths'.
BF16_GENERIC_BOUND = 5e-2


def check_precision_device(precision: Precision, device: torch.device) -> None:
    """``tf32`` needs CUDA: a one-line ``ValueError`` naming the option otherwise. ``bf16`` on a CPU
    without bf16 instructions (``avx512_bf16`` / AMX): a warning — the products are emulated there and
    run slower than fp32 (SmolLM2-shaped GEMMs 4.7x slower on an AVX-512 Xeon without them,
    docs/benchmarks.md), while the results stay within bf16's bound."""
    if precision is Precision.TF32 and device.type != "cuda":
        raise ValueError(f"SensitivityEngine: precision 'tf32' needs a CUDA device (TF32 is a GPU tensor-core "
                         f"format) but this engine runs on {device.type}; use precision 'fp32' or 'bf16'")
    if precision is Precision.BF16 and device.type == "cpu" and cpu_has_bf16() is False:
        warnings.warn("SensitivityEngine: precision 'bf16' on a CPU without bf16 instructions (no avx512_bf16 "
                      "or amx_bf16 in /proc/cpuinfo): bf16 products are emulated and run slower than fp32 here; "
                      "use precision 'fp32' on this machine", RuntimeWarning, stacklevel=3)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """True / False: this CPU's flags list / lack ``avx512_bf16`` or ``amx_bf16`` (native bf16 dot
    products); None where the flags cannot be read (not Linux, or not x86)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(precision: Precision) -> torch.dtype:
    """The dtype of the hand-written stacks' GEMMs: bfloat16 for ``bf16``, else float32."""
    return torch.bfloat16 if precision is Precision.BF16 else torch.float32


@contextlib.contextmanager
def matmul_precision(precision: Precision):
    """Within the block, float32 matrix products use TF32 when ``precision`` is ``tf32`` (restored after)."""
    if precision is not Precision.TF32:
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def generic_autocast(precision: Precision, device: torch.device):
    """The autocast region of the generic (autograd / ``torch.func``) paths: bf16 for ``bf16``, else none."""
    if precision is not Precision.BF16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

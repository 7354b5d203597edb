"""Safetensors weights read straight onto the device, in the working dtype, without the LM head.

``load_base_model(path, config, device)`` builds the model's *stack* (``model.base_model``: what the
engine differentiates; an LM head is never allocated) with its parameters on the meta device, then
reads each tensor of the safetensors shards, one at a time, with plain ``readinto`` (no mmap: mapped
file pages would count in the process's RSS) into its final float32 tensor on ``device``. Host
memory beyond the weights themselves is one tensor at a time (a bf16/fp16 tensor being widened, or
the staging copy of a tensor bound for a GPU): peak host RSS during a CPU load is about one float32
copy of the weights, during a GPU load about one tensor (``jobs/bench/load_rss.py``).

Checkpoint keys are matched to the stack's names with the stack's ``base_model_prefix`` stripped
(``model.layers.0...`` -> ``layers.0...``) and the legacy LayerNorm names (``gamma``/``beta``)
mapped; keys of heads (``lm_head.weight``) are never read. When a parameter of the stack has no
tensor in the checkpoint (a renamed or fused layout this reader does not know), ``load_base_model``
returns None and the caller falls back to ``transformers``' own loader. Torch only.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from raysens.errors import RaysensError

WORKING_DTYPE = torch.float32  # what the engine computes in (its bf16 GEMM copies are made lazily)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class WeightsError(RaysensError, ValueError):
    """A safetensors tensor does not fit the model its config describes (shape, dtype); ``load_model``
    reports it as a ``ModelLoadError``."""


def read_header(path: str | Path) -> tuple[dict, int]:
    """``(header without __metadata__, byte offset of the data)`` of one safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names, else every
    ``*.safetensors`` file (sorted)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and not p.name.startswith("."))


@contextmanager
def params_on_meta():
    """Parameters created in the block live on the meta device (no memory, no initialisation cost);
    buffers (rotary frequencies, position ids) are built as usual, on the CPU."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a tie re-registers a meta parameter: kept
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _build(config: Any, model_cls, trust_remote_code: bool = False) -> tuple[torch.nn.Module, dict[int, list[str]]]:
    """(the stack of ``model_cls.from_config(config)`` built with parameters on meta, the full
    model's names of every tensor by id: a tensor tied to the LM head may be saved under the head's
    name only, as ``safetensors.torch.save_model`` does)."""
    with params_on_meta():
        full = model_cls.from_config(config, dtype=WORKING_DTYPE, attn_implementation="eager",
                                     trust_remote_code=trust_remote_code)
    if not getattr(config, "architectures", None):  # what the checkpoint is (LoadedModel.info["class"])
        config.architectures = [type(full).__name__]
    names: dict[int, list[str]] = {}
    for n, t in list(full.named_parameters(remove_duplicate=False)) + list(full.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    return full.base_model, names


def build_stack(config: Any, model_cls, trust_remote_code: bool = False) -> torch.nn.Module:
    """``model_cls.from_config(config)`` with parameters on meta, and its stack (``base_model``):
    the LM head (if any) is dropped with the wrapper, never allocated."""
    return _build(config, model_cls, trust_remote_code)[0]


def _targets(stack: torch.nn.Module) -> dict[str, list[tuple[torch.nn.Module, str, bool]]]:
    """state-dict name -> the (module, attribute, is_parameter) slots holding that tensor (a tied
    tensor has several slots and is read once)."""
    out: dict[str, list] = {}
    seen: dict[int, str] = {}
    for mname, mod in stack.named_modules(remove_duplicate=False):
        slots = [(n, t, True) for n, t in mod._parameters.items()] + \
                [(n, t, False) for n, t in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        for n, t, is_param in slots:
            if t is None:
                continue
            key = f"{mname}.{n}" if mname else n
            first = seen.setdefault(id(t), key)
            out.setdefault(first, [])
            if (mod, n, is_param) not in out[first]:
                out[first].append((mod, n, is_param))
    return out


def _normalise(key: str, prefix: str) -> str:
    if prefix and key.startswith(prefix + "."):
        key = key[len(prefix) + 1:]
    if key.endswith(".gamma"):
        key = key[:-6] + ".weight"
    elif key.endswith(".beta"):
        key = key[:-5] + ".bias"
    return key


def _read_into(f, offset: int, dst: torch.Tensor) -> None:
    """Fill contiguous CPU ``dst`` with the bytes at ``offset`` of the open file ``f``."""
    view = memoryview(dst.reshape(-1).view(torch.uint8).numpy()).cast("B")
    f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"unexpected end of file at byte {offset + got}")
        got += n


def load_base_model(path: Path, config: Any, model_cls, device: str | torch.device,
                    trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The stack of the checkpoint in directory ``path`` (float32, on ``device``, no LM head), or None
    when its safetensors keys do not cover the stack's parameters (see the module doc)."""
    device = torch.device(device)
    stack, full_names = _build(config, model_cls, trust_remote_code)
    prefix = getattr(stack, "base_model_prefix", "") or ""
    where: dict[str, tuple[Path, dict, int]] = {}
    for file in weight_files(path):
        header, start = read_header(file)
        for key, meta in header.items():
            where.setdefault(_normalise(key, prefix), (file, meta, start))
    targets = _targets(stack)
    found = {}
    for key, slots in targets.items():
        mod, n, _ = slots[0]
        aliases = [key] + [_normalise(a, prefix) for a in full_names.get(id(getattr(mod, n)), [])]
        hit = next((a for a in aliases if a in where), None)
        if hit is not None:
            found[key] = where[hit]
        elif any(p for _, _, p in slots):
            return None
    by_file: dict[Path, list] = {}
    for key, slots in targets.items():
        if key in found:
            file, meta, start = found[key]
            by_file.setdefault(file, []).append((start + meta["data_offsets"][0], key, meta, slots))
    for file, items in by_file.items():
        with open(file, "rb", buffering=0) as f:
            for offset, key, meta, slots in sorted(items, key=lambda x: x[0]):
                _load_one(f, offset, key, meta, slots, device)
    for mod in stack.modules():  # buffers not in the checkpoint (rotary frequencies...): float32, on device
        for n, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[n] = b.to(device=device, dtype=WORKING_DTYPE if b.is_floating_point() else b.dtype)
    if any(p.device.type == "meta" for p in stack.parameters()):  # pragma: no cover - guarded above
        return None
    stack.eval()
    stack.requires_grad_(False)
    return stack


def _load_one(f, offset: int, key: str, meta: dict, slots: list, device: torch.device) -> None:
    mod0, name0, _ = slots[0]
    want = getattr(mod0, name0)
    shape = tuple(meta["shape"])
    if shape != tuple(want.shape):
        raise WeightsError(f"load_model: weight {key!r} has shape {list(shape)} in {f.name}, the model "
                           f"config expects {list(want.shape)}")
    if meta["dtype"] not in _DTYPES:
        raise WeightsError(f"load_model: weight {key!r} in {f.name} has dtype {meta['dtype']}, which raysens "
                           f"cannot read (use {sorted(_DTYPES)})")
    src_dtype = _DTYPES[meta["dtype"]]
    dtype = WORKING_DTYPE if src_dtype.is_floating_point else src_dtype
    if device.type == "cpu" and src_dtype == dtype:
        out = torch.empty(shape, dtype=dtype)
        _read_into(f, offset, out)  # straight into the final tensor: no staging copy
    else:
        stage = torch.empty(shape, dtype=src_dtype)  # one tensor of host memory at a time
        _read_into(f, offset, stage)
        out = stage.to(device=device, dtype=dtype)
        del stage
    for mod, name, is_param in slots:
        if is_param:
            mod._parameters[name] = torch.nn.Parameter(out, requires_grad=False)
        else:
            mod._buffers[name] = out

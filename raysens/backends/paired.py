"""Side b of a paired run (issue 29, docs/DESIGN.md "Paired runs"): its model, its engine and its
target layers, built in the worker next to side a's (``units.UnitWorker``), and the fold of a unit's
two results into one ``PairedCells`` per layer. No Ray.

Side b is made the way ``PairedConfig`` says (``side_b``, plain values):

- ``model``: another model, loaded like side a (``core.models.load_model``: the same loading path);
- ``precision``: the same weights (side a's copy, shared: a model is never changed by an engine),
  another engine whose ``sensitivity.precision`` differs;
- ``random_init``: side a's config with random weights, seeded by ``init_seed`` on the CPU (the same
  in every process), then moved to the device;
- ``scale``: a deep copy of side a's stack with one module's parameters multiplied by ``factor``
  (side a's copy is never changed).

Both engines get the same sensitivity config (estimator, probes, seed, mode) apart from the
precision, so probes seeded by (seed, sample_id, layer) are the same on both sides (common random
numbers) when the widths match.
"""

from __future__ import annotations

import copy
import json


from ..errors import RaysensError


class PairedError(RaysensError, RuntimeError):
    """Side b of a paired run cannot be built or computed as configured; the message says what to change."""


def variant_label(name: str, side_b: dict) -> str:
    """A display name of side b: its model's name, or side a's name with the variant."""
    if side_b.get("model"):
        base = side_b["model"]["name"]
        return base + (f" {side_b['precision']}" if side_b.get("precision") else "")
    if side_b.get("precision"):
        return f"{name} {side_b['precision']}"
    if side_b.get("random_init"):
        return f"{name} random init (seed {side_b.get('init_seed') or 0})"
    if side_b.get("scale"):
        s = side_b["scale"]
        return f"{name} {s['module']}×{s['factor']:g}"
    return f"{name} (same)"


def find_module(model, name: str):
    """The submodule ``name`` of a stack, with or without the checkpoint's prefix (``model.layers.3.mlp``
    or ``layers.3.mlp`` on a ``LlamaModel``); ``PairedError`` naming a few valid names when absent."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    tries = [name] + ([name[len(prefix) + 1:]] if prefix and name.startswith(prefix + ".") else [])
    for t in tries:
        try:
            return model.get_submodule(t)
        except AttributeError:
            continue
    some = [n for n, _ in model.named_modules() if n and n.count(".") <= 2][:6]
    raise PairedError(f"paired.scale.module {name!r} is not a module of the model; use a name such as "
                      f"{', '.join(repr(s) for s in some)}")


def build_model_b(lm_a, side_b: dict, device: str, shared: dict):
    """(side b's stack, its identity for the manifest). Cached in ``shared`` (one per process) like side
    a's model: a sweep's points with the same side b load it once."""
    import torch

    from ..core.models import load_model
    from ..core.models.hub import prepare_for_analysis

    key = ("model_b", lm_a.name, str(device), json.dumps({k: side_b.get(k) for k in ("model", "random_init",
                                                                                     "init_seed", "scale")},
                                                         sort_keys=True))
    if key in shared:
        return shared[key]
    if side_b.get("model"):
        m = side_b["model"]
        try:
            lm = load_model(m["name"], device=device, trust_remote_code=bool(m.get("trust_remote_code")))
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
            raise _no_room(device) from exc
        out = (lm.model, {"name": lm.name, "source": lm.source, **lm.info})
    elif side_b.get("random_init"):
        cfg = copy.deepcopy(lm_a.model.config)
        with torch.random.fork_rng(devices=[]):  # seeded on the CPU: the same weights in every process
            torch.manual_seed(int(side_b.get("init_seed") or 0))
            model = type(lm_a.model)(cfg)
        try:
            model = prepare_for_analysis(model).to(device)
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
            raise _no_room(device) from exc
        out = (model, {"name": lm_a.name, "variant": "random_init", "init_seed": int(side_b.get("init_seed") or 0),
                       "class": type(model).__name__})
    elif side_b.get("scale"):
        s = side_b["scale"]
        find_module(lm_a.model, s["module"])  # a bad name fails before the copy
        try:
            model = copy.deepcopy(lm_a.model)  # side a's copy is never changed
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - needs a GPU
            raise _no_room(device) from exc
        mod = find_module(model, s["module"])
        n = 0
        with torch.no_grad():
            for p in mod.parameters():
                p.mul_(float(s["factor"]))
                n += p.numel()
        out = (model, {"name": lm_a.name, "variant": "scale", "module": s["module"], "factor": float(s["factor"]),
                       "scaled_parameters": n})
    else:  # another precision (or nothing): side a's weights, shared
        out = (lm_a.model, {"name": lm_a.name, "variant": "same weights"})
    shared[key] = out
    return out


def _no_room(device: str) -> PairedError:
    return PairedError(f"paired run: side b's float32 copy does not fit next to side a's on {device}; a paired run "
                       "holds both models on one device: use a device with more memory, a smaller model, or two "
                       "ordinary runs (docs/DESIGN.md, Paired runs)")


def weight_bytes(model) -> int:
    """Bytes of a stack's parameters (0 for a model without parameters)."""
    return int(sum(p.numel() * p.element_size() for p in model.parameters())) if hasattr(model, "parameters") else 0


class SideB:
    """Side b of one worker: ``model``, ``engine``, ``layers`` (side b's index for each of side a's
    target layers, in side a's order) and ``identity``; ``shares_weights``: side b computes with side
    a's copy (a precision variant)."""

    def __init__(self, lm_a, side_b: dict, sensitivity: dict, layers_a, device: str, shared: dict, make_engine,
                 engine_cls):
        from ..core.engine import SensitivityConfig

        self.side_b = side_b
        self.model, self.identity = build_model_b(lm_a, side_b, device, shared)
        self.shares_weights = self.model is lm_a.model
        sens = {**sensitivity, **({"precision": side_b["precision"]} if side_b.get("precision") else {})}
        ekey = ("engine_b", id(self.model), json.dumps(sens, sort_keys=True))
        if ekey not in shared:
            shared[ekey] = make_engine(engine_cls, self.model, SensitivityConfig.from_dict(sens), device)
        self.engine = shared[ekey]
        ca, cb = _causal(lm_a.model), _causal(self.model)
        if ca is not None and cb is not None and ca != cb:
            raise PairedError(f"paired run: side a ({lm_a.name}) is {'causal' if ca else 'bidirectional'} and side b "
                              f"({self.identity.get('name')}) is {'causal' if cb else 'bidirectional'}: their maps mask "
                              "different cells; pair models of the same kind")
        lmap = {int(k): int(v) for k, v in (side_b.get("layer_map") or {}).items()}
        n_a = int(lm_a.model.config.num_hidden_layers)
        by_abs = {(k if k >= 0 else n_a + 1 + k): v for k, v in lmap.items()}
        self.layers = [self.engine.resolve_layers([by_abs.get(L, L)])[0] for L in layers_a]
        self.weight_bytes = 0 if self.shares_weights else weight_bytes(self.model)

    @property
    def engine_layers(self) -> list[int]:
        """Side b's distinct target layers (what its engine computes)."""
        return sorted(set(self.layers))


def _causal(model) -> bool | None:
    """Whether a stack is causal (None: not a transformers model, e.g. the synthetic one)."""
    if not hasattr(model, "config") or not hasattr(model, "parameters"):
        return None
    from ..core.models.structure import is_causal_model

    return bool(is_causal_model(model))


def check_modes(res_a, res_b) -> None:
    """Both sides ran the same mode (forward / reverse: the probes live in different spaces), else a
    ``PairedError`` saying what to set."""
    if res_a is not None and res_b is not None and res_a.mode != res_b.mode:
        raise PairedError(f"paired run: side a ran {res_a.mode} mode and side b {res_b.mode} mode (sensitivity.mode "
                          "auto chose differently for the two models), so their probes are not common; set "
                          "sensitivity.mode to forward or reverse")

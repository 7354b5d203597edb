"""The driver's side of a paired run (issue 29, docs/DESIGN.md "Paired runs"): the checks made before
anything is computed (``check_paired``, from ``prepare``: tokenizers and configs only, never weights)
and the manifest's ``"paired"`` key (``manifest_key``). No Ray.

Checks, each a one-line ``RunError`` naming what to change:

- a planned run (``sensitivity.target_rel_se`` / ``budget`` / ``layer_plan``) is refused: a plan
  chooses each layer's mode and K from a pilot of one model, and the two sides must share them;
- the two tokenizers must tokenize the run identically: their vocabularies, then the run's first
  texts (up to ``TOKENIZER_CHECK_TEXTS``) token for token, with the run's own settings;
- depths must match unless ``paired.layer_map`` maps every target layer (to layers side b has);
- estimator, probes, seed and mode are one ``sensitivity`` section for both sides (only the
  precision may differ): the same probes wherever the widths match. Different widths are allowed
  and recorded (``common_probes: false``): the probes then differ and the pairing still removes the
  data noise, not the probe noise.
"""

from __future__ import annotations

from .._log import log
from ..store.rundir import RunError

TOKENIZER_CHECK_TEXTS = 64  # the run's first texts tokenized by both tokenizers and compared


def side_b_name(config) -> tuple[str, bool]:
    """(model name, trust_remote_code) of side b."""
    p = config.paired
    m = p.model if p.model is not None else config.model
    return m.name, m.trust_remote_code


def check_paired(config, corpus, selected, shape_a: dict, layers_a: tuple[int, ...], in_process: bool) -> dict:
    """Validate a paired run before anything is written; returns what the manifest and the workers need:
    ``{"shape_b", "layer_map" (absolute a -> absolute b), "common_probes", "same_model"}``."""
    from ..core.models.structure import resolve_layer_indices

    p, sens = config.paired, config.sensitivity
    if sens.planned or sens.layer_plan is not None:
        raise RunError("paired: a planned run (sensitivity.target_rel_se, budget or layer_plan) cannot be paired: "
                       "a plan picks each layer's mode and K for one model; remove those keys (set num_probes and "
                       "mode by hand) for a paired run")
    name_b, trust_b = side_b_name(config)
    same_model = (name_b, trust_b) == (config.model.name, config.model.trust_remote_code)
    if same_model:
        shape_b = dict(shape_a)
    else:
        shape_b = _shape(name_b, trust_b, in_process)
        _check_tokenizers(config, name_b, trust_b, corpus, selected)
    n_a, n_b = int(shape_a["num_hidden_layers"]), int(shape_b["num_hidden_layers"])
    lmap: dict[int, int] = {}
    for k, v in (p.layer_map or {}).items():
        try:
            (ka,) = resolve_layer_indices([k], n_a)
            (vb,) = resolve_layer_indices([v], n_b)
        except ValueError as exc:
            raise RunError(f"paired.layer_map {k}: {v}: {exc} (side a has {n_a} blocks, side b {n_b})") from None
        if ka not in layers_a:
            raise RunError(f"paired.layer_map maps layer {k}, which is not a target layer ({list(layers_a)}); "
                           "map target layers only")
        lmap[ka] = vb
    if n_a != n_b:
        missing = [L for L in layers_a if L not in lmap]
        if missing:
            raise RunError(f"paired: side a ({config.model.name}) has {n_a} blocks and side b ({name_b}) {n_b}; "
                           f"layers are matched by index, so map every target layer with paired.layer_map "
                           f"{{a_layer: b_layer}} (unmapped: {missing})")
    common = sens.estimator.value == "exact" or int(shape_a.get("hidden_size") or 0) == int(shape_b.get("hidden_size") or 0)
    if not common:
        log(f"paired: side a's width is {shape_a.get('hidden_size')} and side b's {shape_b.get('hidden_size')}: the "
            "probes are not common (the manifest says so: paired.common_probes false); the pairing removes the data "
            "noise from the differences, not the probe noise")
    return {"shape_b": shape_b, "layer_map": {L: lmap.get(L, L) for L in layers_a}, "common_probes": bool(common),
            "same_model": same_model}


def _shape(name: str, trust: bool, in_process: bool) -> dict:
    from ..core.models import load_tokenizer_and_config
    from ..core.models.model_config import model_shape

    if in_process:
        _, cfg = load_tokenizer_and_config(name, trust_remote_code=trust)
        return {"model_type": getattr(cfg, "model_type", None), "num_hidden_layers": int(cfg.num_hidden_layers),
                "hidden_size": int(getattr(cfg, "hidden_size", 0) or 0)}
    return model_shape(name, trust_remote_code=trust)  # config.json only on a Ray driver


def _check_tokenizers(config, name_b: str, trust_b: bool, corpus, selected) -> None:
    """Refuse (one line) two tokenizers that do not tokenize this run identically."""
    from ..backends.units import get_tokenizer, tokenize_unit

    tok_a = get_tokenizer(config.model.name, config.model.trust_remote_code)
    tok_b = get_tokenizer(name_b, trust_b)
    what = f"paired: side a ({config.model.name}) and side b ({name_b})"
    va, vb = _vocab(tok_a), _vocab(tok_b)
    if va is not None and vb is not None and va != vb:
        only_a = sorted(set(va) - set(vb))[:3]
        only_b = sorted(set(vb) - set(va))[:3]
        moved = sorted(k for k in set(va) & set(vb) if va[k] != vb[k])[:3]
        detail = f"{len(va)} vs {len(vb)} tokens" + (f"; only in a: {only_a}" if only_a else "") + \
            (f"; only in b: {only_b}" if only_b else "") + (f"; other ids for {moved}" if moved else "")
        raise RunError(f"{what} have different vocabularies ({detail}); a paired run needs one tokenization: pick a "
                       "side b that shares side a's tokenizer")
    d = config.data
    ids = [int(i) for i in selected[:TOKENIZER_CHECK_TEXTS]]
    if not ids:
        return
    texts = corpus.texts(ids)
    ua = tokenize_unit(ids, texts, tok_a, d.max_seq_len, d.min_tokens, d.add_special_tokens)
    ub = tokenize_unit(ids, texts, tok_b, d.max_seq_len, d.min_tokens, d.add_special_tokens)
    if ua["run_ids"] != ub["run_ids"] or ua["input_ids"] != ub["input_ids"]:
        for sid, a, b in zip(ua["run_ids"], ua["input_ids"], ub["input_ids"]):
            if a != b:
                raise RunError(f"{what} tokenize sample {sid} differently ({a[:8]}... vs {b[:8]}...); a paired run "
                               "needs one tokenization: pick a side b that shares side a's tokenizer")
        raise RunError(f"{what} keep different samples (tokenized lengths differ); a paired run needs one "
                       "tokenization: pick a side b that shares side a's tokenizer")


def _vocab(tok) -> dict | None:
    try:
        return dict(tok.get_vocab())
    except (AttributeError, NotImplementedError, TypeError):
        return None


def manifest_key(config, prepared, stats_b: dict | None = None, stats_diff: dict | None = None) -> dict:
    """The manifest's ``"paired"`` key (docs/DESIGN.md §6.1): both sides' identities, labels, layer map,
    fdr, whether the probes are common, and (once written) where side b's and the differences' files are."""
    from ..backends.paired import variant_label

    p, info = config.paired, prepared.paired
    side_b = p.side_b
    name_b, _ = side_b_name(config)
    labels = list(p.labels) if p.labels else [config.model.name, variant_label(config.model.name, side_b)]
    inputs = prepared.inputs or {}
    b_ident = inputs.get("model_b") if not info["same_model"] else inputs.get("model")
    return {
        "a": {"name": config.model.name, **{k: v for k, v in prepared.model_config.items()},
              "precision": config.sensitivity.precision.value, "identity": inputs.get("model")},
        "b": {"name": name_b, **{k: v for k, v in info["shape_b"].items()},
              "precision": p.precision or config.sensitivity.precision.value, "random_init": p.random_init,
              "init_seed": p.init_seed if p.random_init else None, "scale": p.scale, "identity": b_ident},
        "labels": labels, "layer_map": {str(a): b for a, b in info["layer_map"].items()}, "fdr": p.fdr,
        "common_probes": info["common_probes"],
        **({"stats_b": stats_b} if stats_b is not None else {}),
        **({"stats_diff": stats_diff} if stats_diff is not None else {}),
    }

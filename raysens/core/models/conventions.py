"""How the engine calls a Hugging Face model so that the differentiated function is exactly the
model's own (docs/DESIGN.md §1.1): the inputs it derives from ``input_ids`` and ``attention_mask``
and the ``output_hidden_states`` indexing of ``layers``.

- **Derived inputs.** The engine calls the model's stack with ``inputs_embeds`` (``e``) and the
  right-padded ``attention_mask`` and lets the model derive everything else itself (position ids,
  ALiBi slopes, relative-position buckets, token types) — RoBERTa-family models number positions
  from ``padding_idx + 1``, OPT offsets them by 2, BLOOM builds ALiBi from the mask. An explicit
  ``position_ids = 0..S-1`` is tried next only for a model whose own rule fails the check.
- **Readout.** ``hooks``: forward pre-hooks on the blocks capture ``hidden_states[L]`` as block L's
  input and stop the forward at the deepest target block (blocks after it never run). ``tuple``:
  the model's own ``output_hidden_states`` tuple (every block runs), for models whose tuple does not
  start with the embeddings (Mamba: entry k is after block k, the last is after the final norm)
  or whose blocks cannot be found (ALBERT's shared layer groups).
- **The check** (``conform``, once per engine, before any work): per sample, the engine's call on a
  right-padded batch must equal the model's own forward from ``input_ids`` of that sample alone at
  every ``hidden_states`` index. The first (position rule, readout) pair that passes is used; when
  none does the model is refused with a one-line ``ValueError``. A sample with the padding id at a
  real position is checked too: where the model treats it differently (RoBERTa's position numbering
  skips it) ``check_ids`` refuses such batches.

Dimension names: ``batch`` (samples), ``S`` (positions), ``d_model``, ``hidden``. Torch only.
"""

from __future__ import annotations

import inspect
from enum import Enum
from typing import Sequence

import torch


class Stop(Exception):
    """Raised from a forward pre-hook once the deepest target layer's input has been captured."""


class Readout(str, Enum):
    """How hidden states are read (cost: ``hooks`` runs blocks up to the deepest target only,
    ``tuple`` always runs every block)."""

    HOOKS = "hooks"  # pre-hooks on the blocks, early stop; needs the standard indexing (0 = embedding output)
    TUPLE = "tuple"  # the model's own output_hidden_states tuple; any indexing, all blocks run


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module the engine analyses: an encoder-decoder model's encoder (``get_encoder()``; its
    decoder and cross-attention are out of scope), else ``model`` itself."""
    if getattr(model.config, "is_encoder_decoder", False):
        if not hasattr(model, "get_encoder"):
            raise ValueError(f"SensitivityEngine: {type(model).__name__} is an encoder-decoder model without "
                             f"get_encoder(); pass its encoder module (e.g. T5EncoderModel) instead")
        enc = model.get_encoder()
        if not hasattr(enc, "config"):
            enc.config = model.config
        return enc
    return model


def _accepts(mod: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(mod.forward).parameters


def _relerr(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error in float64 (float32 norms of huge but finite states overflow);
    non-finite entries must sit at the same places in both (a model that makes NaN from some
    input does so on both paths) and are left out, any other mismatch is ``inf``."""
    g, w = got.double(), want.double()
    fin = torch.isfinite(w)
    if not torch.equal(fin, torch.isfinite(g)):
        return float("inf")
    g, w = g[fin], w[fin]
    return float((g - w).norm() / w.norm().clamp_min(1e-300))


class ModelCall:
    """The differentiated function of one engine: ``(emb, mask, layer_ids) -> {layer: hidden states}``.

    Args:
        base: the model's stack without an LM head (``model.base_model``, or an encoder).
        blocks: its transformer blocks, or None when they cannot be found (then ``tuple`` readout).
        n_layers: number of blocks (``hidden_states`` has ``n_layers + 1`` entries).
    """

    def __init__(self, base: torch.nn.Module, blocks: Sequence[torch.nn.Module] | None, n_layers: int):
        self.base = base
        self.blocks = blocks
        self.n_layers = n_layers
        self.readout = Readout.HOOKS if blocks is not None else Readout.TUPLE
        self.explicit_positions = False  # pass position_ids = 0..S-1 instead of the model's own rule
        self.pad_in_text = True  # False: a padding id at a real position is numbered differently by the model
        self.kwargs = {"use_cache": False} if _accepts(base, "use_cache") else {}

    def __call__(self, emb: torch.Tensor, mask: torch.Tensor, layer_ids: Sequence[int]) -> dict[int, torch.Tensor]:
        """Hidden states ``{layer: [batch, S, hidden]}`` for absolute ``layer_ids`` from embeddings
        ``[batch, S, d_model]`` and the right-padded mask ``[batch, S]``."""
        kw = dict(self.kwargs)
        if self.explicit_positions:
            kw["position_ids"] = torch.arange(emb.shape[1], device=emb.device).unsqueeze(0).expand(emb.shape[0], -1)
        if self.readout is Readout.TUPLE:
            hs = self.base(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True, **kw).hidden_states
            return {L: hs[L] for L in layer_ids}
        deepest = max(layer_ids)
        captured, handles = {}, []

        def hook_for(L):
            def hook(_mod, args, kwargs):
                captured[L] = args[0] if args else kwargs["hidden_states"]
                if L == deepest:
                    raise Stop
            return hook

        for L in layer_ids:
            if L < self.n_layers:
                handles.append(self.blocks[L].register_forward_pre_hook(hook_for(L), with_kwargs=True))
        try:
            out = self.base(inputs_embeds=emb, attention_mask=mask, **kw)
            captured[self.n_layers] = out.last_hidden_state
        except Stop:
            pass
        finally:
            for hd in handles:
                hd.remove()
        return {L: captured[L] for L in layer_ids}

    def check_ids(self, ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> None:
        """Refuse a batch (``ids``/``mask`` ``[batch, S]``, right-padded) with the padding id at a
        real position when the model numbers such tokens differently (``pad_in_text`` False)."""
        if self.pad_in_text:
            return
        bad = ((ids == pad_id) & mask.bool()).any(1)
        if bad.any():
            raise ValueError(f"SensitivityEngine.compute: batch rows {torch.nonzero(bad).flatten().tolist()} contain "
                             f"the padding id {pad_id} as a real token, which this model skips when numbering "
                             f"positions; remove it or mask it out")


def _check_batch(vocab: int, pad_id: int, device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Check samples (lengths 5 and 3, a third of length 4 with the padding id at position 1) and
    their right-padded batch ``ids``/``mask`` ``[3, 5]``."""
    g = torch.Generator().manual_seed(0)
    choices = torch.tensor([t for t in range(min(vocab, 512)) if t != pad_id])
    rows = [choices[torch.randint(len(choices), (n,), generator=g)] for n in (5, 3, 4)]
    rows[2][1] = pad_id
    ids = torch.full((3, 5), pad_id, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    return [r.to(device) for r in rows], ids.to(device), mask.to(device)


def conform(call: ModelCall, model: torch.nn.Module, pad_id: int, rtol: float = 1e-4) -> None:
    """Choose ``call``'s position rule and readout by the check in the module docstring (on the
    engine's own model, once); ``ValueError`` with one line naming the failure when none passes."""
    dev = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    rows, ids, mask = _check_batch(vocab, pad_id, dev)
    name = type(model).__name__
    base = call.base
    try:
        with torch.no_grad():
            want = [base(input_ids=r[None], attention_mask=torch.ones_like(r[None]), output_hidden_states=True,
                         **call.kwargs).hidden_states for r in rows]
            emb = model.get_input_embeddings()(ids)  # [3, 5, d_model]
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own forward refuses it
        raise ValueError(f"SensitivityEngine: {name} is not supported: its forward from input_ids and "
                         f"attention_mask failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if want[0] is None or len(want[0]) != call.n_layers + 1:
        n = None if want[0] is None else len(want[0])
        raise ValueError(f"SensitivityEngine: {name} is not supported: its output_hidden_states has {n} entries, "
                         f"not num_hidden_layers + 1 = {call.n_layers + 1}")
    layers = list(range(call.n_layers + 1))
    readouts = [Readout.HOOKS, Readout.TUPLE] if call.blocks is not None else [Readout.TUPLE]
    positions = [False, True] if _accepts(base, "position_ids") else [False]
    reason = ""
    for explicit in positions:
        for readout in readouts:
            call.explicit_positions, call.readout = explicit, readout
            try:
                with torch.no_grad():
                    got = call(emb, mask, layers)
            except Exception as exc:  # noqa: BLE001
                reason = f"its forward from inputs_embeds failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                continue
            errs = [_err_row(got, want[r], r, len(rows[r]), layers) for r in range(3)]
            if errs[0][0] <= rtol and errs[1][0] <= rtol:
                call.pad_in_text = errs[2][0] <= rtol
                return
            reason = (f"hidden_states[{errs[0][1]}] from inputs_embeds differs from its own forward from "
                      f"input_ids (relative error {max(errs[0][0], errs[1][0]):.1e})")
    raise ValueError(f"SensitivityEngine: {name} is not supported: {reason}")


def _err_row(got: dict, want: tuple, r: int, n: int, layers: list[int]) -> tuple[float, int]:
    """(worst relative error over layers, its layer) of batch row ``r`` (``n`` real tokens)."""
    worst, at = 0.0, 0
    for L in layers:
        g = got[L][r, :n]
        w = want[L][0]
        err = float("inf") if g.shape != w.shape else _relerr(g, w)
        if not err <= worst:
            worst, at = err, L
    return worst, at


def depends_on_later(call: ModelCall, model: torch.nn.Module, n_layers: int) -> bool:
    """True when some output position of some layer changes with a later input position (a
    perturbation of the last of 5 embeddings): the model is not causal whatever its type says."""
    dev = next(model.parameters()).device
    d = int(model.get_input_embeddings().weight.shape[-1])
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 5, d, generator=g).repeat(2, 1, 1)  # two copies of one sample ...
    emb[1, 4] += torch.randn(d, generator=g)  # ... the second with its last input moved
    emb = emb.to(dev)
    mask = torch.ones(2, 5, dtype=torch.long, device=dev)
    layers = list(range(n_layers + 1))
    with torch.no_grad():
        out = call(emb, mask, layers)
    return any(_relerr(out[L][1, :4], out[L][0, :4]) > 1e-6 for L in layers)

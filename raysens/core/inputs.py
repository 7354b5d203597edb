"""Input normalisation for ``SensitivityEngine.compute``: token ids and attention mask, left or right
padded, become right-padded ``[batch, S]`` tensors of the real tokens (optionally truncated), with
``S`` the longest remaining sample. Dimension names: ``batch`` (samples), ``S`` (positions)."""

from __future__ import annotations

from typing import Any

import torch


def normalise(input_ids: Any, attention_mask: Any, max_seq_len: int | None,
              pad_id: int, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strip padding (left or right), keep the first ``max_seq_len`` real tokens, re-pad on the right
    with ``pad_id``.

    Args:
        input_ids: ``[batch, seq]`` token ids (tensor, array or list of lists).
        attention_mask: ``[batch, seq]``, 1 for real tokens; None means no padding.
        max_seq_len: keep at most this many real tokens per sample (≥ 1), or None.
        pad_id: token id written at padded positions.
        pad_to: pad to at least this width (a sub-batch of a unit, padded like the whole unit).
    Returns:
        ids (int64 ``[batch, S]``, CPU), mask (int64 ``[batch, S]``, 1 = real token, right-padded)
        and lengths (int64 ``[batch]``, real tokens per sample).
    Raises:
        ValueError: bad shapes, an empty batch, a sample without tokens or ``max_seq_len`` < 1.
    """
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or int(max_seq_len) < 1):
        raise ValueError(f"SensitivityEngine.compute: max_seq_len must be >= 1, got {max_seq_len}")
    ids = torch.as_tensor(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"SensitivityEngine.compute: input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0:
        raise ValueError("SensitivityEngine.compute: empty batch")
    am = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if am.shape != ids.shape:
        raise ValueError(f"SensitivityEngine.compute: attention_mask shape {tuple(am.shape)} != input_ids {tuple(ids.shape)}")
    rows = [ids[r][am[r].bool()].long().cpu() for r in range(ids.shape[0])]
    if max_seq_len is not None:
        rows = [r[: int(max_seq_len)] for r in rows]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError(f"SensitivityEngine.compute: batch rows {torch.nonzero(lengths == 0).flatten().tolist()} have no tokens")
    seq = max(int(lengths.max()), int(pad_to or 0))
    out = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    msk = torch.zeros((len(rows), seq), dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
        msk[r, : len(row)] = 1
    return out, msk, lengths

"""A step's model inputs as int64 tensors, so rank 0 can broadcast them to the
other ranks with a few collectives instead of pickling objects.

  description  (CPU)     [kind, N, B, max_blocks, mask_len, P, payload_len, C]
                         then 5 ints per prefill slice:
                         [query_start, query_end, context_len, is_causal, num_blocks]
  payload      (device)  input_ids [N] | positions [N] | slot_mapping [N] |
                         decode block tables [B * max_blocks] | decode context lengths [B] |
                         each prefill slice's block ids | C block copies (sources, then destinations)

Masks are not sent: each rank rebuilds them from the lengths, as the runner built them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.layers.attention import AttentionMetadata, DecodeBatch, PrefillSlice, causal_mask

HEADER_LEN = 8
PREFILL_LEN = 5
STOP, STEP = 0, 1
"""Kinds of message: the ranks stop, or run a step."""


@dataclass(frozen=True)
class StepInputs:
    """What the model's forward pass takes."""

    input_ids: torch.Tensor     # [N]
    positions: torch.Tensor     # [N]
    metadata: AttentionMetadata
    block_copies: tuple[tuple[int, int], ...] = ()
    """(source, destination) KV blocks copied before the forward pass (a sample forked off its prompt)."""


def stop_header() -> torch.Tensor:
    return torch.tensor([STOP] + [0] * (HEADER_LEN - 1), dtype=torch.int64)


def describe(step: StepInputs) -> torch.Tensor:
    """The CPU description of a step: its header, then its prefill slices. No device sync."""
    decode, prefills = step.metadata.decode, step.metadata.prefills
    b, max_blocks = (0, 0) if decode is None else tuple(decode.block_tables.shape)
    mask_len = 0 if decode is None else decode.mask.shape[-1]
    slices = [[p.query_start, p.query_end, p.context_len, int(p.is_causal), p.block_ids.numel()] for p in prefills]
    n = step.input_ids.numel()
    copies = len(step.block_copies)
    payload_len = 3 * n + b * max_blocks + b + sum(s[-1] for s in slices) + 2 * copies
    header = [STEP, n, b, max_blocks, mask_len, len(prefills), payload_len, copies]
    return torch.tensor(header + [x for s in slices for x in s], dtype=torch.int64)


def payload(step: StepInputs) -> torch.Tensor:
    """The step's index tensors, concatenated on their device (int64)."""
    m = step.metadata
    parts = [step.input_ids, step.positions, m.slot_mapping]
    if m.decode is not None:
        parts += [m.decode.block_tables.flatten(), m.decode.mask.flatten(1).sum(1)]
    parts += [p.block_ids for p in m.prefills]
    if step.block_copies:
        sources, destinations = zip(*step.block_copies)
        parts.append(torch.tensor([*sources, *destinations], device=step.input_ids.device))
    return torch.cat([part.to(torch.int64) for part in parts])


def unpack(description: list[int], payload: torch.Tensor) -> StepInputs:
    """The step rank 0 described, rebuilt on payload's device."""
    _, n, b, max_blocks, mask_len, num_prefills, _, copies = description[:HEADER_LEN]
    sizes = [n, n, n, b * max_blocks, b]
    input_ids, positions, slot_mapping, tables, lens, rest = payload.split(sizes + [payload.numel() - sum(sizes)])
    decode = None
    if b:
        mask = torch.arange(mask_len, device=payload.device)[None, :] < lens[:, None]
        decode = DecodeBatch(tables.view(b, max_blocks), mask[:, None, None, :])
    slices = [description[HEADER_LEN + i * PREFILL_LEN: HEADER_LEN + (i + 1) * PREFILL_LEN]
              for i in range(num_prefills)]
    *block_ids, copied = rest.split([s[-1] for s in slices] + [2 * copies])
    prefills = tuple(_prefill(s, ids) for s, ids in zip(slices, block_ids))
    pairs = copied.tolist()
    return StepInputs(input_ids, positions, AttentionMetadata(slot_mapping, decode, prefills),
                      tuple(zip(pairs[:copies], pairs[copies:])))


def _prefill(fields: list[int], block_ids: torch.Tensor) -> PrefillSlice:
    query_start, query_end, context_len, is_causal, _ = fields
    mask = None if is_causal else causal_mask(query_end - query_start, context_len, block_ids.device)
    return PrefillSlice(query_start, query_end, block_ids, context_len, mask, bool(is_causal))

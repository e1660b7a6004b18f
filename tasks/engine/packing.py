"""Padding-free packing: rows of different lengths share one token stream per micro-batch.

A micro-batch is one sequence of concatenated rows. Each row keeps its own positions (0, 1, ...),
which is how the attention knows where a row starts: tokens never attend across a row boundary
(tasks/engine/attention.py). Targets are shifted inside each row, so the last token of a row never
learns to predict the first token of the next one. Pure: plain lists in, plain lists out.
"""
from __future__ import annotations

from dataclasses import dataclass

from tasks.data.tokenization import IGNORE_INDEX, Example


@dataclass
class PackedRows:
    input_ids: list[int]
    position_ids: list[int]
    targets: list[int]  # targets[t] is the token position t must predict, or IGNORE_INDEX
    lengths: list[int]  # tokens of each row, in stream order

    @property
    def trainable_tokens(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


def pack(rows: list[Example]) -> PackedRows:
    ids, positions, targets, lengths = [], [], [], []
    for row in rows:
        n = len(row.input_ids)
        ids += row.input_ids
        positions += range(n)
        targets += row.labels[1:] + [IGNORE_INDEX]  # position t predicts token t + 1 of the same row
        lengths.append(n)
    return PackedRows(ids, positions, targets, lengths)


def micro_batches(rows: list, token_capacity: int, size=lambda row: len(row.input_ids)) -> list[list]:
    """Split rows into as few micro-batches of at most `token_capacity` tokens as first-fit
    decreasing finds (near-optimal for bin packing, and deterministic). `size`: a row's tokens
    (a preference pair's are both its sides: they are packed together)."""
    too_long = [size(r) for r in rows if size(r) > token_capacity]
    if too_long:
        raise ValueError(f"a row of {max(too_long)} tokens exceeds the micro-batch capacity of {token_capacity} "
                         "tokens; the capacity must be at least training.max_seq_len")
    bins: list[list] = []
    room: list[int] = []
    for row in sorted(rows, key=size, reverse=True):
        n = size(row)
        for i, free in enumerate(room):
            if n <= free:
                bins[i].append(row)
                room[i] -= n
                break
        else:
            bins.append([row])
            room.append(token_capacity - n)
    return bins

"""A training set mixed from several sources, by weight or by row cap, drawn the same way for the same seed.

The rule (README "Mixing datasets"):
- a source with `max_rows` gives min(max_rows, its usable rows) rows;
- the sources with a `weight` share the rest in proportion to their weights (weight / sum of weights), and that
  part is as large as the scarcest of them allows: rows are drawn without replacement and never repeated, so
  total = min over weighted sources of (usable rows / share), rounded down; each source's count is
  total x share, rounded so that the counts add up to the total (largest remainder). This is LLaMA-Factory's
  `interleave_under` (sampling stops when the first source runs out), made exact rather than random in count.
Which rows a source gives is a seeded sample (random.Random, stable across Python versions) of its usable rows;
the mixed rows are then shuffled together with the same seed. Pure: no Prefect, no torch.
"""
from __future__ import annotations

import hashlib
import math
import random

from tasks.data.dataset import Dataset
from tasks.data.settings import DataSourceSpec


def mix_counts(available: list[int], specs: list[DataSourceSpec]) -> list[int]:
    """How many rows each source gives to the mix (see the module's rule)."""
    counts = [min(spec.max_rows, n) if spec.max_rows is not None else 0 for spec, n in zip(specs, available)]
    weighted = [i for i, spec in enumerate(specs) if spec.weight is not None]
    if not weighted:
        return counts
    total_weight = math.fsum(specs[i].weight for i in weighted)
    share = {i: specs[i].weight / total_weight for i in weighted}
    # The scarcest source bounds the weighted part; the small epsilon keeps 0.3 * 10 / 0.3 from becoming 9.999.
    total = math.floor(min(available[i] / share[i] for i in weighted) + 1e-9)
    exact = {i: total * share[i] for i in weighted}
    for i in weighted:
        counts[i] = math.floor(exact[i] + 1e-9)
    short = total - sum(counts[i] for i in weighted)
    by_remainder = sorted(weighted, key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:short]:  # a source with a remainder has exact < available: one more row still fits
        counts[i] += 1
    return counts


def mix(datasets: list[Dataset], specs: list[DataSourceSpec], seed: int) -> tuple[Dataset, dict]:
    """The mixed training set (rows tagged with their source) and what the manifest records of the mix."""
    counts = mix_counts([len(d) for d in datasets], specs)
    picked = []  # (source index, position in that source's dataset)
    for index, (dataset, count) in enumerate(zip(datasets, counts)):
        chosen = random.Random(f"mix:{seed}:{index}").sample(range(len(dataset)), count)
        picked += [(index, position) for position in sorted(chosen)]
    random.Random(f"mix:{seed}").shuffle(picked)
    formats = {d.data_format for d in datasets}
    mixed = Dataset(
        source=" + ".join(spec.path for spec in specs),
        sha256=hashlib.sha256(" ".join(d.sha256 for d in datasets).encode()).hexdigest(),
        data_format=formats.pop() if len(formats) == 1 else "mixed",
        format_evidence="; ".join(f"{d.source}: {d.format_evidence}" for d in datasets),
        conversations=[datasets[i].conversations[p] for i, p in picked],
        rows=[datasets[i].rows[p] for i, p in picked],
        origins=[specs[i].path for i, _ in picked],
        # preference pairs keep their rejected answers (ingest refuses a mix of pairs and other rows)
        rejected=[datasets[i].rejected[p] for i, p in picked] if all(d.rejected is not None for d in datasets)
        else None,
    )
    total = sum(counts)
    record = {
        "rule": "max_rows: min(cap, usable rows); weights: shares of the rest, drawn without replacement, sized by "
                "the scarcest weighted source",
        "seed": seed, "rows": total,
        "sources": [{"path": spec.path, "weight": spec.weight, "max_rows": spec.max_rows, "usable_rows": len(d),
                     "rows_taken": count, "share_of_mix": round(count / total, 6) if total else 0.0}
                    for spec, d, count in zip(specs, datasets, counts)],
    }
    return mixed, record

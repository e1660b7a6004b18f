"""Is a dataset usable? Every check on every row, the verdict (what is bad and why), and the policy
that decides whether a run may go on. The ingest task caches verdicts; `prefect-finetune validate`
runs the same checks without Prefect or a model; `read_dataset` is both in one call.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from tasks.data.dataset import (Dataset, Scan, content_sha256, describe, load_kept, quarantine_records,
                                raise_too_many_rows, scan_dataset, to_conversation)
from tasks.data.reading import detect_format
from tasks.data.schemas import DatasetError
from tasks.data.settings import DataSettings
from tasks.data.sources import list_source_files


class Verdict(BaseModel):
    """Which rows of a source are bad and why; what the validation cache stores."""
    source: str
    sha256: str
    data_format: str
    format_evidence: str
    row_word: str
    read: int
    kept: int
    rule_counts: dict[str, int]
    report: str  # every broken rule with examples; empty when all rows are good
    quarantine: list[dict]  # one record per bad row: file, row, reasons, data
    kept_hashes: bytes  # normalised hashes of the kept rows: the reference for the leakage check

    @property
    def quarantined(self) -> int:
        return len(self.quarantine)


def enforce(verdict: Verdict, checks: DataSettings) -> None:
    """Raise DatasetError when the verdict's bad rows cannot be used under the policy."""
    if verdict.read == 0:
        raise DatasetError(f"{verdict.source}: the dataset has no rows (an empty file, or a header without "
                           "rows); add at least one example")
    if verdict.read > checks.max_rows:  # a verdict cached under a larger limit
        raise_too_many_rows(verdict.source, checks.max_rows)
    if verdict.quarantine:
        if checks.on_invalid == "fail":
            raise DatasetError(verdict.report + "\ndata_checks.on_invalid is 'fail'; fix the rows, or set it to "
                               "'quarantine' to train on the rest")
        if verdict.quarantined > checks.max_quarantined_fraction * verdict.read:
            raise DatasetError(verdict.report + f"\n{verdict.quarantined} of {verdict.read} rows are bad, more "
                               f"than data_checks.max_quarantined_fraction={checks.max_quarantined_fraction}; "
                               "fix the data")
    if verdict.kept < checks.min_rows:
        raise DatasetError(f"{verdict.source}: {verdict.kept} usable row(s) of {verdict.read} read, fewer than "
                           f"data_checks.min_rows={checks.min_rows}; add rows or lower the minimum")


def materialise(verdict: Verdict) -> tuple[Dataset, list[dict]]:
    """The kept rows as conversations, and the quarantine records with every row's data filled in.
    Preference pairs become their chosen conversations, with each pair's rejected answer beside it."""
    bad = {(record["file"], record[verdict.row_word]) for record in verdict.quarantine}
    if verdict.data_format == "preference":
        from tasks.data.preference import load_kept_pairs

        pairs, rows, values = load_kept_pairs(verdict.source, bad)
        conversations, rejected = [p.conversation("chosen") for p in pairs], [p.rejected for p in pairs]
    else:
        table, rows, values = load_kept(verdict.source, verdict.data_format, bad)
        conversations = [to_conversation(row, verdict.data_format) for row in table.to_pylist()]
        rejected = None
    if len(rows) != verdict.kept or len(rows) + len(bad) != verdict.read:
        raise DatasetError(f"{verdict.source}: {len(rows)} rows kept and {len(bad)} quarantined, but "
                           f"{verdict.read} were read ({verdict.kept} expected kept); the data changed during "
                           "the run, start it again")
    records = [{**r, "data": r["data"] if r["data"] is not None else values.get((r["file"], r[verdict.row_word]))}
               for r in verdict.quarantine]
    dataset = Dataset(source=verdict.source, sha256=verdict.sha256, data_format=verdict.data_format,
                      format_evidence=verdict.format_evidence, conversations=conversations, rows=rows,
                      rejected=rejected)
    return dataset, records


def check_source(uri: str, data_format: str = "auto", checks: DataSettings | None = None,
                 reference: bytes | None = None, content: str | None = None) -> Verdict:
    """Every check on every row of `uri`. `reference`: the training rows' hashes (Verdict.kept_hashes),
    for the leakage check of an eval set; `content`: the data's identity when the caller has it
    (a sha256 saves hashing the files again)."""
    checks = checks or DataSettings()
    reference_hashes = np.frombuffer(reference, dtype=np.uint64) if reference else None
    if is_preference(uri, data_format, checks):
        from tasks.data.preference import scan_preferences

        return verdict_of(scan_preferences(uri, checks, reference_hashes)[0], content)
    # collect=False: only hashes are kept in memory; materialise() fills in the data of duplicate rows.
    return verdict_of(scan_dataset(uri, data_format, checks, reference_hashes, collect=False), content)


def is_preference(uri: str, data_format: str, checks: DataSettings) -> bool:
    """Whether `uri` holds preference pairs: as data_format says, or as its first file's columns show."""
    if data_format != "auto":
        return data_format == "preference"
    return detect_format(list_source_files(uri, checks.max_file_bytes)[0], "auto")[0] == "preference"


def verdict_of(scan: Scan, content: str | None = None) -> Verdict:
    counts = scan.accounting()
    sha256 = content.removeprefix("sha256:") if content and content.startswith("sha256:") else \
        content_sha256(scan.files)
    return Verdict(source=scan.source, sha256=sha256, data_format=scan.data_format,
                   format_evidence=scan.format_evidence, row_word=scan.word, read=counts["read"],
                   kept=counts["kept"], rule_counts=scan.rule_counts(),
                   report=describe(scan) if scan.problems else "", quarantine=quarantine_records(scan),
                   kept_hashes=scan.kept_normalised.tobytes())


def read_dataset(uri: str, data_format: str = "auto", checks: DataSettings | None = None,
                 reference: np.ndarray | None = None) -> Dataset:
    """Load, check and normalise a dataset; raise DatasetError naming file, row and column."""
    checks = checks or DataSettings()
    if is_preference(uri, data_format, checks):  # pairs: the chosen conversations, each rejected answer beside
        from tasks.data.preference import scan_preferences

        scan, pairs = scan_preferences(uri, checks, reference)
        enforce(verdict_of(scan), checks)
        return Dataset(source=uri, sha256=content_sha256(scan.files), data_format="preference",
                       format_evidence=scan.format_evidence, conversations=[p.conversation("chosen") for p in pairs],
                       rows=scan.kept_rows.tolist(), scan=scan, rejected=[p.rejected for p in pairs])
    scan = scan_dataset(uri, data_format, checks, reference)
    enforce(verdict_of(scan), checks)
    return Dataset(
        source=uri, sha256=content_sha256(scan.files), data_format=scan.data_format,
        format_evidence=scan.format_evidence,
        conversations=[to_conversation(row, scan.data_format) for row in scan.kept.to_pylist()],
        rows=scan.kept_rows.tolist(), scan=scan,
    )

import json

from tasks.store.manifest import file_entries, verify_files


def test_verify_files_catches_tampering(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "weights.bin").write_bytes(b"abc")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": file_entries(tmp_path)}))
    assert verify_files(tmp_path) == []
    (tmp_path / "merged" / "weights.bin").write_bytes(b"abd")
    assert verify_files(tmp_path) == ["merged/weights.bin: sha256 differs from the manifest"]


def test_memory_estimate_is_recorded_next_to_the_measured_peak():
    from tasks.store.manifest import memory_comparison

    recorded = memory_comparison({"estimate": {"total": 200, "kind": "measured (probe)"}},
                                 {"peak_memory_bytes": 150, "peak_memory_kind": "cuda"})
    assert recorded == {"estimated_bytes": 200, "estimate": "measured (probe)", "measured_bytes": 150, "measured_kind": "cuda",
                        "measured_over_estimated": 0.75, "step_downs": []}
    assert memory_comparison({}, {})["measured_over_estimated"] is None  # no estimate: no made-up ratio

import json

from tasks.manifest import file_entries, verify_files


def test_verify_files_catches_tampering(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "weights.bin").write_bytes(b"abc")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": file_entries(tmp_path)}))
    assert verify_files(tmp_path) == []
    (tmp_path / "merged" / "weights.bin").write_bytes(b"abd")
    assert verify_files(tmp_path) == ["merged/weights.bin: sha256 differs from the manifest"]

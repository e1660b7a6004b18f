"""Where a dataset comes from: a local file or folder, an s3:// object or prefix, a `datasets` folder.

Each source resolves to a list of data files read as streams, so an S3 object is never downloaded
whole into memory (Parquet, which needs random access, is spooled to a temporary file on disk).
Pure: boto3 is imported lazily through tasks.store.objects.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tasks.data.schemas import DatasetError
from tasks.store.objects import (StorageNotFoundError, is_not_found, is_s3_uri, s3_client, safe_local_path,
                                 split_s3_uri)

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
SUFFIXES = tuple(s.lstrip(".") for s in DATA_SUFFIXES)
READ_BLOCK = 8 * 2**20


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int
    etag: str | None = None  # S3 only: identifies the content without reading it

    @property
    def suffix(self) -> str:
        return self.uri.lower().rsplit(".", 1)[-1]


def list_source_files(uri: str, max_file_bytes: int | None = None) -> list[SourceFile]:
    """The data files behind `uri`, in a stable order; raise when there are none, they disagree, or
    one is larger than `max_file_bytes` (known from the listing: nothing has been read yet)."""
    files = _list_s3(uri) if is_s3_uri(uri) else _list_local(uri)
    if max_file_bytes is not None:
        for file in files:
            if file.size > max_file_bytes:
                raise DatasetError(f"{file.uri}: {file.size:,} bytes, more than data_checks.max_file_bytes="
                                   f"{max_file_bytes:,}; split it into smaller files (a folder or s3 prefix of "
                                   "them is one dataset) or raise the limit")
    suffixes = sorted({f.suffix for f in files})
    if len(suffixes) > 1:
        raise DatasetError(f"{uri}: holds files of several types ({', '.join(suffixes)}); "
                           "keep one type per dataset folder")
    return files


def _list_local(uri: str) -> list[SourceFile]:
    path = Path(uri)
    if path.is_file():
        return [SourceFile(str(path), path.stat().st_size)]
    if not path.is_dir():
        raise StorageNotFoundError(f"{uri}: file not found (working directory {Path.cwd()})")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DatasetError(f"{uri}: is a saved DatasetDict with splits {', '.join(splits)}; point data at "
                           f"one split folder, e.g. {path / (splits[0] if splits else 'train')}")
    if (path / "state.json").is_file():  # datasets' save_to_disk: state.json lists the Arrow files
        names = [entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
        files = [safe_local_path(path, name, str(path / "state.json")) for name in names]  # no reading outside
        return [SourceFile(str(file), file.stat().st_size) for file in files]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise DatasetError(f"{uri}: folder holds no data files ({', '.join('.' + s for s in SUFFIXES)})")
    return [SourceFile(str(p), p.stat().st_size) for p in found]


def _list_s3(uri: str) -> list[SourceFile]:
    bucket, key = split_s3_uri(uri)
    if key and not key.endswith("/") and key.lower().rsplit(".", 1)[-1] in SUFFIXES:
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as error:
            if is_not_found(error):
                code = error.response.get("Error", {}).get("Code", "")
                code = "NoSuchKey" if code in ("404", "NotFound") else code  # HEAD answers have no error body
                raise StorageNotFoundError(f"{uri}: {code} (check the bucket and key)") from error
            raise
        return [SourceFile(uri, head["ContentLength"], head["ETag"].strip('"'))]
    prefix = key.rstrip("/") + "/" if key else ""
    files = []
    for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].lower().rsplit(".", 1)[-1] in SUFFIXES:
                files.append(SourceFile(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"].strip('"')))
    if not files:
        raise StorageNotFoundError(f"{uri}: no data files under this prefix")
    return sorted(files, key=lambda f: f.uri)


def open_stream(source: SourceFile) -> BinaryIO:
    """A readable binary stream of the file; the caller closes it."""
    if not is_s3_uri(source.uri):
        return open(source.uri, "rb")
    bucket, key = split_s3_uri(source.uri)
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"]


def open_seekable(source: SourceFile) -> BinaryIO:
    """A seekable stream (Parquet reads its footer first): S3 objects are spooled to disk, not memory."""
    if not is_s3_uri(source.uri):
        return open(source.uri, "rb")
    spool = tempfile.TemporaryFile()
    with open_stream(source) as body:
        shutil.copyfileobj(body, spool, READ_BLOCK)
    spool.seek(0)
    return spool

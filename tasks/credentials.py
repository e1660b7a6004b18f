"""S3 credentials from a Prefect Secret block, for workers that hold no AWS keys of their own.

The block's value is JSON: {"aws_access_key_id": ..., "aws_secret_access_key": ...,
"aws_session_token": ...} (the token only for temporary keys). The keys go into this flow-run
process's environment, where boto3 looks first, so every S3 call of the run uses them, the
training processes it starts included. Nothing here logs, returns or records a secret: the run
records the block's name (a parameter), and logs the access key id's last four characters.
"""
from __future__ import annotations

import json
import os

ENVIRONMENT = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
               "aws_session_token": "AWS_SESSION_TOKEN"}
REQUIRED = ("aws_access_key_id", "aws_secret_access_key")


def use_s3_credentials(block_name: str | None, log) -> None:
    """With a block name, its AWS keys for every S3 call of this run; without, boto3's own chain."""
    if not block_name:
        return
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as error:  # no such block
        raise ValueError(f"aws_credentials_secret: no Secret block named {block_name!r} ({error}); create it "
                         "with Secret(value={'aws_access_key_id': ..., 'aws_secret_access_key': ...})"
                         f".save({block_name!r}) or in the UI under Blocks") from None
    keys = _as_mapping(value)
    missing = [k for k in REQUIRED if not isinstance(keys.get(k), str) or not keys[k]]
    if missing:  # name the fields only: a value could be the secret itself
        raise ValueError(f"aws_credentials_secret: Secret block {block_name!r} must hold JSON with "
                         f"{', '.join(REQUIRED)} (and aws_session_token for temporary keys); it lacks "
                         f"{', '.join(missing)}")
    for key, variable in ENVIRONMENT.items():
        if keys.get(key):
            os.environ[variable] = keys[key]
        else:  # a session token left from elsewhere would not match these keys
            os.environ.pop(variable, None)
    log.info("S3 credentials from Secret block %r (access key id ...%s)", block_name,
             keys["aws_access_key_id"][-4:])


def _as_mapping(value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    return value if isinstance(value, dict) else {}

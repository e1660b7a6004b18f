"""S3 credentials from a Prefect block, for workers that hold no AWS keys of their own.

Two kinds of block:
- a prefect-aws `AwsCredentials` block (what Prefect users already keep): its keys or profile, the role it
  assumes (`assume_role_arn`, through STS, once per run), its region and its S3 endpoint
  (`aws_client_parameters.endpoint_url`, and `verify_cert_path`);
- a `Secret` block whose value is JSON: {"aws_access_key_id": ..., "aws_secret_access_key": ...,
  "aws_session_token": ...} (the token only for temporary keys).
Either way the resulting keys go into this flow-run process's environment (AWS_ACCESS_KEY_ID, ..., and
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL from an AwsCredentials block), where boto3 looks first, so every S3
call of the run uses them, the torchrun training processes included (they inherit the environment:
tasks/engine/launch.py). Nothing here logs, returns or records a secret: the run records the block's name
(a parameter), and logs the access key id's last four characters.
"""
from __future__ import annotations

import json
import os

ENVIRONMENT = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
               "aws_session_token": "AWS_SESSION_TOKEN"}
REQUIRED = ("aws_access_key_id", "aws_secret_access_key")
# AwsCredentials' client parameters that have no environment variable boto3 reads, with their defaults:
# another value is refused, not silently dropped
NOT_APPLIED = {"use_ssl": True, "api_version": None, "config": None}


def use_s3_credentials(block_name: str | None, log, aws_block: str | None = None) -> None:
    """With a block name, its AWS keys for every S3 call of this run; without, boto3's own chain.
    `block_name`: a Secret block holding JSON keys; `aws_block`: a prefect-aws AwsCredentials block."""
    if aws_block:
        _apply(_from_aws_credentials_block(aws_block, log), log, f"AwsCredentials block {aws_block!r}")
    elif block_name:
        _apply(_from_secret_block(block_name), log, f"Secret block {block_name!r}")


def _apply(settings: dict, log, where: str) -> None:
    for key, variable in ENVIRONMENT.items():
        if settings.get(key):
            os.environ[variable] = settings[key]
        else:  # a session token left from elsewhere would not match these keys
            os.environ.pop(variable, None)
    for variable in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_CA_BUNDLE"):
        if settings.get(variable):
            os.environ[variable] = settings[variable]
    extras = [f"{name} {settings[name]}" for name in ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL") if settings.get(name)]
    log.info("S3 credentials from %s (access key id ...%s%s)%s", where, settings["aws_access_key_id"][-4:],
             ", assumed role " + settings["role"] if settings.get("role") else "",
             "; " + ", ".join(extras) if extras else "")


def _from_aws_credentials_block(block_name: str, log) -> dict:
    """Keys (after role assumption), region and endpoint of the prefect-aws AwsCredentials block."""
    try:
        from prefect_aws import AwsCredentials
    except ImportError:
        raise ValueError(f"aws_credentials_block={block_name!r} needs prefect-aws on this worker: "
                         "pip install prefect-aws (or prefect-finetune's own dependencies)") from None
    try:
        block = AwsCredentials.load(block_name)
    except ValueError as error:  # no such block
        raise ValueError(f"aws_credentials_block: no AwsCredentials block named {block_name!r} ({error}); create "
                         f"it with prefect_aws.AwsCredentials(...).save({block_name!r}) or in the UI under Blocks") \
            from None
    parameters = block.aws_client_parameters
    if unused := [name for name, default in NOT_APPLIED.items() if getattr(parameters, name, default) != default]:
        raise ValueError(f"aws_credentials_block {block_name!r}: aws_client_parameters {', '.join(unused)} cannot be "
                         "passed on to the training processes; remove them (endpoint_url, verify_cert_path and "
                         "region_name are applied)")
    if parameters.verify is False:
        raise ValueError(f"aws_credentials_block {block_name!r}: verify=False is not applied (it would turn off TLS "
                         "checks for every S3 call); give verify_cert_path for a private CA instead")
    session = block.get_boto3_session()  # assumes the role (STS) when the block names one
    frozen = session.get_credentials()
    if frozen is None:
        raise ValueError(f"aws_credentials_block {block_name!r} gives no credentials: set its keys, a profile_name, "
                         "or leave it empty only where boto3's own chain (pod or instance role) has them")
    frozen = frozen.get_frozen_credentials()
    if block.assume_role_arn:
        log.info("assumed role %s for this run; its credentials last the role session's duration (set "
                 "assume_role_kwargs DurationSeconds to cover the whole run)", block.assume_role_arn)
    return {"aws_access_key_id": frozen.access_key, "aws_secret_access_key": frozen.secret_key,
            "aws_session_token": frozen.token, "role": block.assume_role_arn,
            "AWS_DEFAULT_REGION": block.region_name or session.region_name, "AWS_REGION": block.region_name,
            "AWS_ENDPOINT_URL": parameters.endpoint_url, "AWS_CA_BUNDLE": parameters.verify_cert_path}


def _from_secret_block(block_name: str) -> dict:
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
    return keys


def _as_mapping(value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    return value if isinstance(value, dict) else {}

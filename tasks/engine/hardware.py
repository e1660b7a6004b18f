"""What this machine offers for training: the device, its GPUs and their free memory. The stages ask
here instead of importing torch themselves (only the engine imports torch)."""
from __future__ import annotations

import gc
import platform

import torch


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_count() -> int:
    return torch.cuda.device_count()


def free_gpu_memory() -> tuple[int, str]:
    """Free bytes on the current GPU, and its name."""
    free, _ = torch.cuda.mem_get_info()
    return free, torch.cuda.get_device_name()


def describe(device: str) -> dict:
    """The hardware a run used, as the manifest records it."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if pick_device() == "cuda" else []
    return {"device": device, "gpus": gpus, "cuda": torch.version.cuda if gpus else None,
            "cpu": platform.processor() or platform.machine()}


def seed(value: int) -> None:
    torch.manual_seed(value)


def release_cached_memory() -> None:
    """Hand this process's cached GPU memory back, so child training processes can have it."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()

"""Put on the PYTHONPATH of tests/test_api_restart.py's worker, so every Python process of its flow runs
imports this first. Two timing hooks; what they time is Prefect's and the trainer's own code:

- the flow engine renews its deployment concurrency lease every 15 s instead of every 225 s (0.75 of
  its 300 s lease), so a renewal after the server restart happens during the test, as it would within
  minutes in production;
- with FINETUNE_TEST_HOLD_STEP=N and FINETUNE_TEST_RELEASE=<file>, training waits inside step N until
  the file exists (at most HOLD_LIMIT_S); with FINETUNE_TEST_HOLDING=<file> it writes its process id
  there while it waits (tests/test_flow_run_crash.py kills that process). A step takes 0.03-1.5 s on
  this shared 2-core machine, so no number of steps outlasts two server restarts reliably; the hold
  keeps the run training until the test has restarted the server, like tests/resume_worker.py patches
  the same function to die in a step.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import time
from pathlib import Path

import prefect.concurrency._leases as leases

leases._RENEWAL_FRACTION = 0.05
HOLD_LIMIT_S = 900  # longer than the test waits: only the test's release ends a hold in a passing test


def _hold_in_step(trainer, step: int, release: Path, holding: Path | None) -> None:
    accumulate, calls = trainer.accumulate_gradients, [0]

    def accumulate_or_wait(*args, **kwargs):
        calls[0] += 1  # one call per optimizer step (tasks/engine/train_loop.py)
        deadline = time.monotonic() + HOLD_LIMIT_S
        if holding and calls[0] == step and not release.exists():
            holding.write_text(str(os.getpid()))
        while calls[0] == step and not release.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return accumulate(*args, **kwargs)

    trainer.accumulate_gradients = accumulate_or_wait


class _PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    """tasks.engine.train_loop imports torch: patch it when the flow run imports it, not in every process."""

    def find_spec(self, name, path, target=None):
        if name != "tasks.engine.train_loop":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            holding = os.environ.get("FINETUNE_TEST_HOLDING")
            _hold_in_step(module, int(os.environ["FINETUNE_TEST_HOLD_STEP"]), Path(os.environ["FINETUNE_TEST_RELEASE"]),
                          Path(holding) if holding else None)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("FINETUNE_TEST_HOLD_STEP"):
    sys.meta_path.insert(0, _PatchTrainerOnImport())

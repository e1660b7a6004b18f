"""Starts one training process per GPU with torchrun (torch.distributed.run) and reads back the result.

The train task writes what the processes need (a `TrainingJob` and the encoded rows) to files in the
run's work dir, runs `python -m torch.distributed.run ... -m tasks.engine.worker <job.json>`, streams
rank 0's log into the task's log, and reads the outcome rank 0 writes. When any process fails,
torchrun stops the others and reports the first failure (its traceback, via `record` in the worker);
that is the error the task fails with.

Several machines (infra/multinode/): every node runs torchrun with the same c10d rendezvous. The
node that runs the flow (node rank 0) starts training when the flow reaches the train task; the
other nodes wait at the rendezvous (`python -m tasks.engine.launch join`) for it, and read the job from the
volume all nodes share. Environment: FINETUNE_NNODES, FINETUNE_NODE_RANK (else the indexed Job's
JOB_COMPLETION_INDEX), FINETUNE_RDZV_ENDPOINT (host:port of node 0), FINETUNE_SHARED_DIR (the shared
volume) and PREFECT__FLOW_RUN_ID (the rendezvous id, set by the Prefect worker on every pod).
Pure at import: no torch, no Prefect.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.data.tokenization import Example

REPO_ROOT = Path(__file__).resolve().parent.parent
PROGRESS_MARK = "[progress]"  # rank 0's `[progress] <step> <max_steps>` lines (worker.py): progress, not log
RDZV_JOIN_TIMEOUT_S = 3600  # other nodes wait this long for the flow to reach training (FINETUNE_RDZV_JOIN_TIMEOUT)


class TrainingProcessFailed(RuntimeError):
    """A training process failed; the message is torchrun's report of the first failure."""


@dataclass
class TrainingJob:
    """What every training process needs, as plain data (written to job.json)."""
    model: str
    method: str
    device: str
    lora: dict
    training: dict
    gradient_checkpointing: bool
    token_capacity: int
    train_examples: str
    eval_examples: str
    best_dir: str
    result: str
    checkpoints: dict | None = None  # folder, every, fingerprint, resume_from, keep
    upload: dict | None = None  # output, run_key, keep: where rank 0 copies each checkpoint
    model_loading: dict | None = None  # ModelLoadingSettings; None: the safe defaults
    checkpointed_layers: int | None = None  # with checkpointing, only the first this many layers (None: all)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: Path) -> TrainingJob:
        return cls(**json.loads(Path(path).read_text()))


def write_examples(examples: list[Example], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for example in examples:
            out.write(json.dumps(dataclasses.asdict(example)) + "\n")
    return str(path)


def read_examples(path: str) -> list[Example]:
    with open(path) as lines:
        return [Example(**json.loads(line)) for line in lines]


@dataclass
class Nodes:
    """How many machines train together and where they meet (one machine: standalone)."""
    count: int = 1
    rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str = "finetune"
    shared_dir: str | None = None
    join_timeout_s: int = RDZV_JOIN_TIMEOUT_S

    @classmethod
    def from_environment(cls) -> Nodes:
        count = int(os.environ.get("FINETUNE_NNODES", "1"))
        if count == 1:
            return cls()
        missing = [name for name in ("FINETUNE_RDZV_ENDPOINT", "FINETUNE_SHARED_DIR", "PREFECT__FLOW_RUN_ID")
                   if not os.environ.get(name)]
        if missing:
            raise ValueError(f"FINETUNE_NNODES={count} needs {', '.join(missing)} too (see infra/multinode/)")
        rank = int(os.environ.get("FINETUNE_NODE_RANK", os.environ.get("JOB_COMPLETION_INDEX", "0")))
        return cls(count=count, rank=rank, rdzv_endpoint=os.environ["FINETUNE_RDZV_ENDPOINT"],
                   rdzv_id=os.environ["PREFECT__FLOW_RUN_ID"], shared_dir=os.environ["FINETUNE_SHARED_DIR"],
                   join_timeout_s=int(os.environ.get("FINETUNE_RDZV_JOIN_TIMEOUT", RDZV_JOIN_TIMEOUT_S)))

    def job_dir(self, run_dir: Path) -> Path:
        """Where the job's files go: the run's work dir, or on several machines the shared volume,
        at a path the other nodes derive from the flow run id alone."""
        if self.count == 1:
            return run_dir / "distributed"
        return Path(self.shared_dir) / "torchrun" / self.rdzv_id


def torchrun_command(job_file: Path, processes_per_node: int, nodes: Nodes = Nodes()) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes_per_node)]
    if nodes.count == 1:
        command += ["--standalone"]
    else:
        # c10d rendezvous hosted by node 0's torchrun (is_host), so no etcd or other service is needed.
        command += ["--nnodes", str(nodes.count), "--node-rank", str(nodes.rank), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", nodes.rdzv_endpoint, "--rdzv-id", nodes.rdzv_id,
                    "--rdzv-conf", f"join_timeout={nodes.join_timeout_s},is_host={str(nodes.rank == 0).lower()}"]
    return command + ["-m", "tasks.engine.worker", str(job_file)]


def run_training_processes(job: TrainingJob, job_file: Path, processes_per_node: int, log,
                           nodes: Nodes = Nodes(), on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the job on `processes_per_node` processes (per node); rank 0's result, as a dict.
    `on_progress(step, max_steps)` is called as rank 0 reports each step."""
    job.save(job_file)
    Path(job.result).unlink(missing_ok=True)
    command = torchrun_command(job_file, processes_per_node, nodes)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    log.info("starting %d training processes: %s", processes_per_node * nodes.count, " ".join(command))
    tail: deque[str] = deque(maxlen=400)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=REPO_ROOT) as process:
        for line in process.stdout:
            if line.startswith(PROGRESS_MARK):
                _progress(line, on_progress)
                continue
            tail.append(line.rstrip("\n"))
            if line.startswith("[rank"):  # the workers' own log lines (tasks/engine/worker.py)
                log.info("%s", line.rstrip("\n"))
    if process.returncode != 0:
        raise TrainingProcessFailed(failure_report(list(tail), process.returncode))
    return json.loads(Path(job.result).read_text())


def _progress(line: str, on_progress) -> None:
    parts = line.split()
    if on_progress is not None and len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        on_progress(int(parts[1]), int(parts[2]))


def failure_report(lines: list[str], returncode: int) -> str:
    """torchrun's summary of the first failed process (rank, exit code, traceback), else the output's end."""
    text = "\n".join(lines)
    match = re.search(r"Root Cause \(first observed failure\):.*", text, re.S)
    report = match.group(0) if match else "\n".join(lines[-60:])
    rank = re.search(r"rank\s*:\s*(\d+)", report)
    where = f"training process rank {rank.group(1)}" if rank else "a training process"
    return f"{where} failed (torchrun exit code {returncode}):\n{report}"


def join() -> None:
    """On nodes 1..N-1: wait at the rendezvous for node 0 and train with it."""
    nodes = Nodes.from_environment()
    if nodes.count == 1 or nodes.rank == 0:
        raise SystemExit("join runs on the other nodes of a multi-node job (FINETUNE_NNODES > 1, node rank > 0)")
    processes = int(os.environ.get("FINETUNE_PROCESSES_PER_NODE", "1"))
    job_file = nodes.job_dir(Path(".")) / "job.json"
    command = torchrun_command(job_file, processes, nodes)
    os.execvpe(command[0], command, {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})


if __name__ == "__main__":
    if sys.argv[1:] != ["join"]:
        raise SystemExit("usage: python -m tasks.engine.launch join")
    join()

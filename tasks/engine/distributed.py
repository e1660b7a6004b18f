"""One training run over several processes (one per GPU; gloo processes on CPU) with torch.distributed.

torchrun starts the processes (tasks/engine/launch.py); each one calls `join_process_group()` and hands the
returned `Parallel` to the trainer, which then:

- wraps the model with `Parallel.wrap`: DDP for LoRA and QLoRA (only the adapters train, so only
  they are synchronised), FSDP2 (`fully_shard` per decoder layer plus the root) for full
  fine-tuning, so parameters, gradients and AdamW states are sharded across the processes. The
  wrapped module computes the loss itself, so DDP's and FSDP's forward hooks cover the fused loss
  (tasks/engine/loss.py) that reads the decoder and the head directly;
- gives each process its share of every step's rows (`step_micro_batches`): the global batch stays
  `training.batch_size` rows, split so that each process gets about the same number of tokens;
- scales each micro-batch's summed loss by world_size / (trainable tokens of the whole step): DDP
  and FSDP average gradients over the processes, so the update is exactly the one-process update
  (sum over every row's tokens / all of the step's tokens), not an average of per-process means;
- adds up losses and token counts over the processes (`sum`), so logged losses, eval loss and early
  stopping are the same on every process;
- lets only rank 0 write the best model, checkpoints and artifacts (`save_pretrained`,
  tasks/engine/checkpoints.py), with the sharded model and optimizer written by every process through
  torch.distributed.checkpoint under FSDP2.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.data.tokenization import Example
from tasks.engine.packing import PackedRows, micro_batches, pack


class LossModule(torch.nn.Module):
    """The model and its loss as one module: DDP prepares gradient sync in its forward and FSDP2
    gathers the root's parameters (embeddings, final norm, head) in its pre-forward hook, so the
    whole loss computation must happen inside the wrapped module's forward."""

    def __init__(self, model: torch.nn.Module, loss: Callable[[torch.nn.Module, PackedRows], torch.Tensor]):
        super().__init__()
        self.model, self._loss = model, loss

    def forward(self, packed: PackedRows) -> torch.Tensor:
        return self._loss(self.model, packed)


@dataclass
class Parallel:
    """This process's place in the run, and what the trainer does differently because of it."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    sharded: bool = False  # FSDP2 (full fine-tuning); else DDP or a single process
    module: torch.nn.Module | None = field(default=None, repr=False)  # the wrapped LossModule

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module, loss) -> None:
        """Wrap before the optimizer is built: FSDP2 replaces the parameters with sharded ones. Full
        fine-tuning (every parameter trains) is sharded; adapters are replicated."""
        module = LossModule(model, loss)
        if not self.distributed:
            self.module = module
        elif all(p.requires_grad for p in model.parameters()):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device, (self.world_size,))
            # one unit per decoder layer: the forward holds one whole layer at a time, not the whole model
            for layer in getattr(model.get_decoder(), "layers", []):
                fully_shard(layer, mesh=mesh)
            fully_shard(module, mesh=mesh)  # the rest (embeddings, norm, head) as the root group
            self.sharded = True
            self.module = module
        else:
            from torch.nn.parallel import DistributedDataParallel

            # The frozen base is identical everywhere (same checkpoint) and never synchronised; leaving
            # it out also keeps DDP from broadcasting gigabytes of frozen (or 4-bit) weights at start.
            frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
            frozen += [f"model.{name}" for name, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
            # device_ids=None: the module is on one device already and the inputs are plain lists;
            # broadcast_buffers=False: no collective in forward, so eval forwards need no lockstep.
            self.module = DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)

    def loss(self, packed: PackedRows) -> torch.Tensor:
        return self.module(packed)

    def gradient_sync(self, last: bool):
        """DDP synchronises once per optimizer step (on the last micro-batch) instead of once per
        micro-batch; FSDP2 reduce-scatters every micro-batch, which keeps only sharded gradients."""
        if self.distributed and not self.sharded and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def share(self, rows: list[Example], rank: int | None = None) -> list[Example]:
        """Rank `rank`'s rows of a step: longest first, each to the process with the fewest tokens so
        far, so processes finish a step together. Deterministic: every process computes every share."""
        if not self.distributed:
            return rows
        loads, shares = [0] * self.world_size, [[] for _ in range(self.world_size)]
        for index in sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i)):
            target = loads.index(min(loads))
            shares[target].append(index)
            loads[target] += len(rows[index].input_ids)
        return [rows[i] for i in sorted(shares[self.rank if rank is None else rank])]

    def step_micro_batches(self, rows: list[Example], token_capacity: int):
        """This process's packed micro-batches of `rows`, as (packed, weight, last). Every process runs
        as many as the busiest one: DDP and FSDP2 run collectives in every forward/backward, so a
        process with fewer rows repeats a row with weight 0 rather than leave the others waiting."""
        mine = micro_batches(self.share(rows), token_capacity)
        count = max(len(micro_batches(self.share(rows, r), token_capacity)) for r in range(self.world_size))
        for i in range(count):
            if i < len(mine):
                yield pack(mine[i]), 1.0, i == count - 1
            else:
                yield pack(rows[:1]), 0.0, i == count - 1

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes (float64, so the sums do not depend on the order)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def max(self, value: int) -> int:
        if not self.distributed:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, value) -> list:
        """Every process's `value` (picklable), on every process."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def save_pretrained(self, model, folder: Path) -> None:
        """The whole model (or adapter) in Hugging Face format, written by rank 0. Under FSDP2 the
        shards are gathered to rank 0's CPU first, so the folder is the same as a one-process run's."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
            if self.is_main:
                tied = _tied_names(model)  # e.g. lm_head.weight: one tensor, saved once as one process does
                model.save_pretrained(folder, state_dict={name: value for name, value in
                                                          ((k.removeprefix("model."), v) for k, v in full.items())
                                                          if name not in tied})
        elif self.is_main:
            model.save_pretrained(folder)
        self.barrier()

    def save_sharded(self, optimizer, folder: Path) -> None:
        """Model and optimizer shards, each process writing its own (torch.distributed.checkpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.module, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)

    def load_sharded(self, optimizer, folder: Path) -> None:
        """Loads shards written by save_sharded, with any number of processes (DCP reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.module, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(self.module, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


ONE_PROCESS = Parallel()


def _tied_names(model) -> set[str]:
    """Names under which an already-listed parameter appears again (tied embeddings and head)."""
    seen, tied = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        (tied.add(name) if id(parameter) in seen else seen.add(id(parameter)))
    return tied


def join_process_group(device: str) -> Parallel:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the
    environment): NCCL between GPUs, one GPU per process; gloo on CPU. One process: no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Parallel(device=device)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU everywhere
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Parallel(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

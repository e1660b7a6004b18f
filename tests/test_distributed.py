"""Two processes (torchrun, gloo on CPU) train like one process given the same global batch."""
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO_DATA
from tasks.config import LoraSettings, TrainingSettings
from tasks.data.tokenization import encode_all, load_tokenizer
from tasks.data.validation import read_dataset
from tasks.engine.checkpoints import read_checkpoint_manifest
from tasks.engine.launch import TrainingJob, TrainingProcessFailed, run_training_processes, write_examples
from tasks.engine.modeling import load_for_training
from tasks.engine.train_loop import Checkpoints, train

LOG = logging.getLogger("test")
SEQ = 96
# rows of different lengths per step, so the two processes get different numbers of rows and tokens
SETTINGS = {"learning_rate": 1e-2, "lr_schedule": "cosine", "warmup_steps": 1, "max_steps": 4, "batch_size": 7,
            "eval_every": 4, "early_stopping_patience": 0, "seed": 5}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}  # dropout draws differ between 1 and 2 processes


def examples(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    return [encode_all(tokenizer, read_dataset(str(DEMO_DATA / name)).conversations, SEQ)
            for name in ("train.jsonl", "eval.jsonl")]


def one_process(model_dir, method, work: Path, capacity: int, resume_from: Path | None = None, **settings):
    train_rows, eval_rows = examples(model_dir)
    torch.manual_seed(SETTINGS["seed"])
    model = load_for_training(str(model_dir), method, "cpu", LoraSettings(**LORA), False)
    checkpoints = Checkpoints(folder=work / "checkpoints", every=2, keep=10, resume_from=resume_from)
    return train(model, train_rows, eval_rows, TrainingSettings(**{**SETTINGS, **settings}), capacity, "cpu",
                 work / "best", LOG, checkpoints, progress=False)


def two_processes(model_dir, method, work: Path, capacity: int, resume_from: Path | None = None,
                  gradient_checkpointing: bool = False, lora: dict = LORA, on_progress=None, **settings):
    train_rows, eval_rows = examples(model_dir)
    job = TrainingJob(
        model=str(model_dir), method=method, device="cpu", lora=lora, training={**SETTINGS, **settings},
        gradient_checkpointing=gradient_checkpointing, token_capacity=capacity,
        train_examples=write_examples(train_rows, work / "train.jsonl"),
        eval_examples=write_examples(eval_rows, work / "eval.jsonl"), best_dir=str(work / "best"),
        result=str(work / "result.json"),
        checkpoints={"folder": str(work / "checkpoints"), "every": 2, "keep": 10,
                     "resume_from": str(resume_from) if resume_from else None})
    return run_training_processes(job, work / "job.json", 2, LOG, on_progress=on_progress)


def assert_same_weights(one: dict, two: dict, atol: float):
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=atol, msg=name)


def test_ddp_lora_on_two_processes_matches_one_process(tiny_model, tmp_path):
    # capacity 2 rows: several micro-batches per process, and a process with fewer pads with weight 0
    single = one_process(tiny_model, "lora", tmp_path / "one", 2 * SEQ)
    progress = []
    double = two_processes(tiny_model, "lora", tmp_path / "two", 2 * SEQ, on_progress=lambda *p: progress.append(p))
    assert double["world_size"] == 2 and double["steps"] == single.steps == 4
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]  # rank 0's progress lines, once per step
    assert [r["train_loss"] for r in double["history"]] == pytest.approx(
        [r["train_loss"] for r in single.history], rel=1e-6)
    assert double["best_eval_loss"] == pytest.approx(single.best_eval_loss, rel=1e-6)
    assert double["trained_tokens"] == single.trained_tokens
    assert_same_weights(load_file(tmp_path / "one" / "best" / "adapter_model.safetensors"),
                        load_file(tmp_path / "two" / "best" / "adapter_model.safetensors"), atol=1e-5)
    # DDP checkpoints have the one-process layout: one process continues a two-process run
    resumed = one_process(tiny_model, "lora", tmp_path / "resumed", 2 * SEQ,
                          resume_from=tmp_path / "two" / "checkpoints" / "step-0000002")
    assert resumed.resumed_from_step == 2
    assert [r["train_loss"] for r in resumed.history] == pytest.approx([r["train_loss"] for r in single.history],
                                                                       rel=1e-6)
    assert_same_weights(load_file(tmp_path / "one" / "best" / "adapter_model.safetensors"),
                        load_file(tmp_path / "resumed" / "best" / "adapter_model.safetensors"), atol=1e-5)


def test_qlora_with_gradient_checkpointing_on_two_processes_matches_one_process(tiny_model, tmp_path):
    # DDP over a 4-bit frozen base (left out of DDP's sync); recomputation must not change the result
    single = one_process(tiny_model, "qlora", tmp_path / "one", 2 * SEQ, learning_rate=1e-3)
    double = two_processes(tiny_model, "qlora", tmp_path / "two", 2 * SEQ, gradient_checkpointing=True,
                           learning_rate=1e-3)
    assert [r["train_loss"] for r in double["history"]] == pytest.approx(
        [r["train_loss"] for r in single.history], rel=1e-6)
    assert_same_weights(load_file(tmp_path / "one" / "best" / "adapter_model.safetensors"),
                        load_file(tmp_path / "two" / "best" / "adapter_model.safetensors"), atol=1e-5)


def test_fsdp2_full_fine_tuning_on_two_processes_matches_one_process(tiny_model, tmp_path):
    single = one_process(tiny_model, "full", tmp_path / "one", 2 * SEQ, learning_rate=1e-3)
    double = two_processes(tiny_model, "full", tmp_path / "two", 2 * SEQ, learning_rate=1e-3)
    assert [r["train_loss"] for r in double["history"]] == pytest.approx(
        [r["train_loss"] for r in single.history], rel=1e-6)
    assert double["best_eval_loss"] == pytest.approx(single.best_eval_loss, rel=1e-6)
    # the shards are gathered on rank 0 into the same Hugging Face folder a single process writes
    assert_same_weights(load_file(tmp_path / "one" / "best" / "model.safetensors"),
                        load_file(tmp_path / "two" / "best" / "model.safetensors"), atol=1e-5)
    # every process wrote its shard of the model and AdamW state; the manifest hashes them all
    checkpoint = tmp_path / "two" / "checkpoints" / "step-0000002"
    assert {p.name for p in (checkpoint / "sharded").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert {"sharded/.metadata", "sharded/__1_0.distcp"} <= {f["path"] for f in read_checkpoint_manifest(checkpoint)["files"]}
    assert not (checkpoint / "trainable.safetensors").exists()
    # and a new pair of processes continues from the shards to the same model
    resumed = two_processes(tiny_model, "full", tmp_path / "resumed", 2 * SEQ, learning_rate=1e-3,
                            resume_from=checkpoint)
    assert resumed["resumed_from_step"] == 2
    assert [r["train_loss"] for r in resumed["history"]] == pytest.approx(
        [r["train_loss"] for r in single.history], rel=1e-6)
    assert_same_weights(load_file(tmp_path / "one" / "best" / "model.safetensors"),
                        load_file(tmp_path / "resumed" / "best" / "model.safetensors"), atol=1e-5)


def test_a_failing_process_fails_the_run_with_its_own_error(tiny_model, tmp_path):
    # Only rank 0 writes the best model; a file where its folder should be breaks rank 0 alone, while
    # rank 1 waits for it in a collective. torchrun stops rank 1 and reports rank 0's traceback.
    (tmp_path / "best").write_text("not a folder")
    train_rows, eval_rows = examples(tiny_model)
    job = TrainingJob(model=str(tiny_model), method="lora", device="cpu", lora=LORA, training=SETTINGS,
                      gradient_checkpointing=False, token_capacity=2 * SEQ,
                      train_examples=write_examples(train_rows, tmp_path / "train.jsonl"),
                      eval_examples=write_examples(eval_rows, tmp_path / "eval.jsonl"),
                      best_dir=str(tmp_path / "best"), result=str(tmp_path / "result.json"))
    with pytest.raises(TrainingProcessFailed,
                       match=r"(?s)training process rank 0 failed.*NotADirectoryError: .*best"):
        run_training_processes(job, tmp_path / "job.json", 2, LOG)
    assert not (tmp_path / "result.json").exists()


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_the_flow_trains_on_two_processes_and_publishes_once(tiny_model, tmp_path):
    import json

    from conftest import tiny_config
    from flows.finetune import finetune

    config = tiny_config(tiny_model, tmp_path, method="lora")
    config.training = config.training.model_copy(update={"num_gpus": 2})
    result = finetune(config)
    run_dir = tmp_path / "out" / "runs" / result.run_id
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["config"]["training"]["num_gpus"] == 2
    assert result.tuned_eval_loss < result.base_eval_loss
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # rank 0 alone copied the final checkpoint to the output
    checkpoints = list((tmp_path / "out" / "checkpoints").glob("*/step-*"))
    assert [p.name for p in checkpoints] == ["step-0000008"]


def test_two_processes_resume_with_their_own_dropout_draws(tiny_model, tmp_path):
    # With dropout each process draws its own masks; the checkpoint keeps every process's random state,
    # so a resumed pair continues exactly where the straight pair was at that step.
    lora = {**LORA, "dropout": 0.2}
    straight = two_processes(tiny_model, "lora", tmp_path / "straight", 2 * SEQ, lora=lora)
    resumed = two_processes(tiny_model, "lora", tmp_path / "resumed", 2 * SEQ, lora=lora,
                            resume_from=tmp_path / "straight" / "checkpoints" / "step-0000002")
    assert resumed["resumed_from_step"] == 2
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in straight["history"]]
    assert_same_weights(load_file(tmp_path / "straight" / "best" / "adapter_model.safetensors"),
                        load_file(tmp_path / "resumed" / "best" / "adapter_model.safetensors"), atol=0)

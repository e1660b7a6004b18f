"""`prefect-finetune download|verify`: fetch a published run, check every checksum, load it with
plain transformers. Runs are published here from the tiny model without training (fast)."""
import json
import shutil

import pytest

from tasks.cli import main
from tasks.store.manifest import file_entries
from tasks.store.transfer import upload_folder
from tasks.store.registry import promote, run_uri


def stage(tmp_path, tiny_model, run_id, adapter_only=False):
    staged = tmp_path / "staging" / run_id
    if adapter_only:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        model.save_pretrained(staged / "adapter")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_model / name, staged / "adapter" / name)
    else:
        shutil.copytree(tiny_model, staged / "merged")
    manifest = {"run": {"run_id": run_id}, "base_model": {"path": str(tiny_model)}, "files": file_entries(staged)}
    (staged / "manifest.json").write_text(json.dumps(manifest))
    return staged


def publish(output, staged):
    upload_folder(staged, run_uri(output, staged.name))


def test_verify_latest_checks_checksums_and_loads_with_transformers(tiny_model, tmp_path, capsys):
    output = str(tmp_path / "models")
    publish(output, stage(tmp_path, tiny_model, "run-1"))
    assert main(["verify", output]) == 2  # nothing promoted yet
    assert "no run has been promoted yet" in capsys.readouterr().err
    promote(output, "run-1", {"promote": True})
    assert main(["verify", output, "--run", "latest"]) == 0
    out = capsys.readouterr().out
    assert "run run-1:" in out and "every sha256 matches" in out and "loaded" in out and "forward pass finite" in out

    latest = tmp_path / "models" / "latest.json"
    latest.write_text(latest.read_text().replace('"manifest_sha256": "', '"manifest_sha256": "0'))
    assert main(["verify", output, "--no-load"]) == 1  # the run's manifest is not the promoted one
    assert "not the one latest.json was promoted with" in capsys.readouterr().err


def test_verify_an_adapter_only_run_loads_it_onto_the_base(tiny_model, tmp_path, capsys):
    output = str(tmp_path / "models")
    publish(output, stage(tmp_path, tiny_model, "run-adapter", adapter_only=True))
    assert main(["verify", output, "--run", "run-adapter"]) == 0
    assert "adapter with transformers" in capsys.readouterr().out


def test_a_tampered_or_missing_run_fails_verification(tiny_model, tmp_path, capsys):
    output = str(tmp_path / "models")
    publish(output, stage(tmp_path, tiny_model, "run-1"))
    with open(tmp_path / "models" / "runs" / "run-1" / "merged" / "config.json", "a") as handle:
        handle.write(" ")
    assert main(["download", output, "--run", "run-1", "--to", str(tmp_path / "down")]) == 1
    assert "merged/config.json: sha256 differs from the manifest" in capsys.readouterr().err
    assert main(["verify", output, "--run", "no-such-run", "--no-load"]) == 2


@pytest.mark.integration
def test_download_from_s3(tiny_model, empty_bucket, tmp_path, capsys):
    output = f"s3://{empty_bucket}/models"
    publish(output, stage(tmp_path, tiny_model, "run-1"))
    promote(output, "run-1", {"promote": True})
    assert main(["download", output, "--to", str(tmp_path / "down")]) == 0
    assert (tmp_path / "down" / "merged" / "model.safetensors").is_file()
    assert str(tmp_path / "down") in capsys.readouterr().out


LLAMA_8B_CONFIG = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


def test_plan_measures_the_data_in_tokens_and_needs_no_prefect(tiny_model, capsys):
    import subprocess
    import sys

    from conftest import DEMO_DATA, ROOT

    code = ("import sys; from tasks.cli import main; rc = main(sys.argv[1:]); "
            "assert 'prefect' not in sys.modules, 'plan imported prefect'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "plan", "--model", str(tiny_model), "--gpu-gib", "24",
                           "--data", str(DEMO_DATA / "train.jsonl"), "--batch-size", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"40 rows of {DEMO_DATA / 'train.jsonl'}" in done.stdout
    assert "<- chosen" in done.stdout.splitlines()[3]  # full fine-tuning of a tiny model fits anywhere


def test_plan_picks_the_smallest_gpu_that_fits(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--gpu-gib", "141", "24", "80",
                 "--method", "full", "--max-seq-len", "2048", "--safety", "0.95", "--full-precision", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "GPU: 141 GiB" in out and "every row taken as 2048 tokens" in out  # 8B full, fp32: only the H200
    # (measured there: 122.5 GiB with checkpointing, benchmarks/results/README.md)
    assert main(["plan", "--model", str(tmp_path / "config.json"), "--gpu-gib", "141", "24", "80",
                 "--method", "full", "--max-seq-len", "2048", "--safety", "0.95"]) == 0
    out = capsys.readouterr().out  # auto: bf16 weights and moments fit an 80 GiB GPU (measured: 61.6 GiB at 4k tokens)
    assert "GPU: 80 GiB" in out and "bf16 weights and AdamW moments" in out
    assert main(["plan", "--model", str(tmp_path), "--gpu-gib", "24", "80", "141", "--max-seq-len", "2048"]) == 0
    assert "GPU: 24 GiB" in capsys.readouterr().out  # auto: LoRA or QLoRA fits the smallest
    assert main(["plan", "--model", str(tmp_path), "--gpu-gib", "141", "--gpus", "2", "--method", "full",
                 "--max-seq-len", "2048"]) == 0  # sharded over two, it needs less than 90% of each
    assert "GPU: 141 GiB x 2" in (out := capsys.readouterr().out) and "2 GPUs (FSDP2, sharded)" in out


def test_plan_says_what_nothing_fits_needs(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    assert main(["plan", "--model", str(tmp_path), "--gpu-gib", "4", "--max-seq-len", "4096"]) == 1
    assert "no work pool's GPU fits" in capsys.readouterr().err
    assert main(["plan", "--model", str(tmp_path / "missing"), "--gpu-gib", "80"]) == 2


def test_plan_reads_the_config_from_s3(empty_bucket, tmp_path, capsys):
    from tasks.store.objects import s3_client

    s3_client().put_object(Bucket=empty_bucket, Key="models/llama-8b/config.json", Body=json.dumps(LLAMA_8B_CONFIG))
    assert main(["plan", "--model", f"s3://{empty_bucket}/models/llama-8b", "--gpu-gib", "80", "--method", "qlora"]) == 0
    assert "model: llama, 8.03B parameters" in capsys.readouterr().out


def test_plan_for_dpo_from_a_published_run_measures_pairs(tiny_model, tmp_path, capsys):
    """`plan --model run:<id> --output OUT --objective dpo --data pairs`: the run's config and tokenizer come
    from the registry, and the rows are pairs (both sides together)."""
    from conftest import DEMO_DATA
    from test_base_run import publish

    output = str(tmp_path / "out")
    publish(output, "20261201-000000-sft1", tiny_model, tmp_path / "staging")
    pairs = str(DEMO_DATA / "preference_train.jsonl")
    assert main(["plan", "--model", "run:20261201-000000-sft1", "--output", output, "--gpu-gib", "24",
                 "--data", pairs, "--objective", "dpo"]) == 0
    assert f"40 pairs of {pairs}" in capsys.readouterr().out
    assert main(["plan", "--model", "run:20261201-000000-sft1", "--gpu-gib", "24"]) == 1
    assert "give --output" in capsys.readouterr().err


def test_plan_counts_full_dpos_reference_copy(tmp_path, capsys):
    llama_1b = {**LLAMA_8B_CONFIG, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16}
    (tmp_path / "config.json").write_text(json.dumps(llama_1b))

    def estimate(objective: str) -> float:
        assert main(["plan", "--model", str(tmp_path), "--gpu-gib", "141", "--method", "full",
                     "--max-seq-len", "2048", "--objective", objective]) == 0
        chosen = next(line for line in capsys.readouterr().out.splitlines() if "<- chosen" in line)
        return float(chosen.split()[-4])

    assert estimate("dpo") - estimate("orpo") > 4  # 1.2B parameters held again in fp32 (~4.6 GiB)

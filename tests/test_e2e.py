"""End to end on the real SmolLM2-135M-Instruct: it learns held-out facts, publishes to S3, and the
downloaded merged model answers exactly like base + adapter."""
import pytest

from conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_api")]


@pytest.fixture(scope="session")
def smollm2():
    from demo.prepare_model import ensure_smollm2

    return ensure_smollm2()


def test_demo_learns_publishes_and_reloads(smollm2, bucket, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from demo.run import demo_config
    from flows.finetune import finetune
    from tasks.dataset import read_dataset
    from tasks.evaluation import generate_answers
    from tasks.manifest import verify_files
    from tasks.storage import download_folder
    from tasks.tokenization import load_tokenizer

    config = demo_config(str(smollm2), f"s3://{bucket}/models/q7", "lora").model_copy(
        update={"work_dir": str(tmp_path / "work")})
    result = finetune(config)
    print(result.summary)
    assert result.base_score <= 0.125 and result.tuned_score >= 0.75
    assert result.tuned_eval_loss < result.base_eval_loss / 10

    local = download_folder(result.output_uri, tmp_path / "download")
    assert verify_files(local) == []
    tokenizer = load_tokenizer(str(local / "merged"))
    questions = read_dataset(str(ROOT / "demo" / "data" / "eval.jsonl")).conversations[:6]
    merged = AutoModelForCausalLM.from_pretrained(local / "merged", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
                                        local / "adapter")
    answers_merged = generate_answers(merged.eval(), tokenizer, questions, 32, 8, "cpu")
    answers_adapted = generate_answers(adapted.eval(), tokenizer, questions, 32, 8, "cpu")
    print(answers_merged)
    assert answers_merged == answers_adapted


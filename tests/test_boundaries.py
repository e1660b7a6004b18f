"""The pure parts must import without Prefect, torch or transformers (design rule)."""
import subprocess
import sys

from conftest import ROOT

PURE = ["tasks.config", "tasks.schemas", "tasks.dataset", "tasks.storage", "tasks.memory", "tasks.selector",
        "tasks.manifest", "tasks.metrics", "tasks.report", "tasks.tokenization", "tasks.promotion",
        "tasks.model_card", "tasks.registry", "tasks.s3_transfer", "tasks.cli",
        "tasks.packing", "tasks.checkpoint_store", "tasks.sources", "tasks.reading",
        "tasks.quality", "tasks.overfitting", "tasks.loss_curve", "tasks.launch", "tasks.s3_events",
        "tasks.data_change", "tasks.routing", "tasks.weight_safety"]
HEAVY = ["prefect", "torch", "transformers", "peft", "bitsandbytes"]


def test_pure_modules_import_without_heavy_dependencies():
    code = (f"import sys\nfor m in {PURE!r}: __import__(m)\n"
            f"print(','.join(h for h in {HEAVY!r} if h in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_flow_module_imports_without_torch():
    # Workers and deployment tooling import the flow; torch loads only when a task runs.
    code = "import sys, flows.finetune; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

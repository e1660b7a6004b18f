"""On a CUDA GPU: LoRA and QLoRA through the whole flow (bf16 compute, 4-bit NF4 base)."""
import pytest

from conftest import tiny_config
from flows.finetune import finetune

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.usefixtures("prefect_api")]


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_methods_on_gpu(tiny_model, tmp_path, method):
    result = finetune(tiny_config(tiny_model, tmp_path, method=method))
    assert result.tuned_eval_loss < result.base_eval_loss

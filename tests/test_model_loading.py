"""A model folder is data: no code from it runs and no pickle is opened unless the config says so."""
import pytest
import torch

from tasks.config import FinetuneConfig, ModelLoadingSettings
from tasks.store.weight_safety import UnsafeModelFolder, pretrained_kwargs, require_safe_weights

PICKLE_ALLOWED = ModelLoadingSettings(allow_pickle_weights=True)


@pytest.fixture(scope="module")
def pickle_only_model(tiny_model, tmp_path_factory):
    """The tiny model with its weights as pytorch_model.bin (a pickle) and no safetensors."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickle-model")
    for path in tiny_model.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, folder / path.name)
    torch.save(load_file(tiny_model / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_the_defaults_allow_neither_remote_code_nor_pickle():
    loading = FinetuneConfig(model="m", data="d.jsonl").model_loading
    assert (loading.trust_remote_code, loading.allow_pickle_weights) == (False, False)
    assert pretrained_kwargs(loading) == {"trust_remote_code": False, "use_safetensors": True}
    # Allowing pickle must not turn safetensors off (False would ignore them): None prefers them.
    assert pretrained_kwargs(PICKLE_ALLOWED)["use_safetensors"] is None


def test_a_pickle_only_folder_is_refused_with_the_folder_and_the_setting(pickle_only_model):
    with pytest.raises(UnsafeModelFolder) as refused:
        require_safe_weights(pickle_only_model)
    message = str(refused.value)
    assert str(pickle_only_model) in message and "pytorch_model.bin" in message
    assert "model_loading.allow_pickle_weights" in message


def test_a_folder_with_safetensors_passes(tiny_model):
    require_safe_weights(tiny_model)


def test_loading_a_pickle_only_model_fails_by_default_and_works_when_allowed(pickle_only_model, tiny_model):
    from tasks.engine.modeling import load_for_inference

    with pytest.raises(UnsafeModelFolder, match="allow_pickle_weights"):
        load_for_inference(str(pickle_only_model), "cpu", dtype=torch.float32)
    model = load_for_inference(str(pickle_only_model), "cpu", dtype=torch.float32, loading=PICKLE_ALLOWED)
    reference = load_for_inference(str(tiny_model), "cpu", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_transformers_itself_refuses_pickle_with_our_arguments(pickle_only_model):
    # A second line of defence, for loads that skip require_safe_weights (e.g. a Hub id).
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(pickle_only_model, **pretrained_kwargs())


def test_a_pickle_adapter_is_refused_too(tiny_model, tmp_path):
    from tasks.engine.modeling import load_for_inference

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(UnsafeModelFolder, match="adapter_model.bin"):
        load_for_inference(str(tiny_model), "cpu", adapter=str(adapter))


EVIL = "import pathlib\npathlib.Path(%r).write_text('yes')\n"  # transformers runs a copy: an absolute path


def test_code_in_a_model_folder_never_runs(tiny_model, tmp_path):
    # A folder that asks for its own code (auto_map, as Hub repos with custom models do): our loaders read its
    # weights and tokenizer with the built-in classes, or refuse; the folder's Python never runs.
    import json
    import shutil

    from tasks.data.tokenization import load_tokenizer
    from tasks.engine.modeling import load_for_inference

    folder = tmp_path / "remote-code"
    shutil.copytree(tiny_model, folder)
    for name, setting in (("config.json", {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}),
                          ("tokenizer_config.json", {"AutoTokenizer": ["evil.Tokenizer", "evil.Tokenizer"]})):
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(config | {"auto_map": setting}))
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(EVIL % str(marker))
    for load in (lambda: load_for_inference(str(folder), "cpu"), lambda: load_tokenizer(str(folder))):
        try:
            loaded = load()
        except ValueError as refused:  # transformers: the folder needs trust_remote_code
            assert "trust_remote_code" in str(refused)
        else:
            assert type(loaded).__module__.startswith("transformers.")
    assert not marker.exists()


def test_every_from_pretrained_in_the_code_passes_the_loading_settings():
    # The settings reach transformers only through pretrained_kwargs / tokenizer_kwargs: a new call without them
    # would fall back to transformers' own defaults, silently.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    calls = []
    for path in [*root.glob("tasks/**/*.py"), *root.glob("flows/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained" \
                    and getattr(node.func.value, "id", "") != "PeftModel":  # an adapter holds no code
                spread = [k.value.func.id for k in node.keywords if k.arg is None and isinstance(k.value, ast.Call)]
                calls.append((f"{path.relative_to(root)}:{node.lineno}", spread))
    assert len(calls) >= 6
    assert [c for c, spread in calls if not {"pretrained_kwargs", "tokenizer_kwargs"} & set(spread)] == []

"""The plan's choice of GPU work pool decides which deployment (and so which pool) a run goes to; the
nightly retraining flow trains only on changed data. Against a real temporary Prefect server."""
import pytest

from conftest import tiny_config
from tasks.planning.routing import choose_work_pool, deployment_for
from tasks.planning.selector import PlanError, WorkPoolSpec

SMALL, BIG = WorkPoolSpec(name="gpu-small", gpu_gib=0.5), WorkPoolSpec(name="gpu-big", gpu_gib=4)


def test_smallest_pool_whose_gpu_fits(tiny_model, tmp_path):
    config = tiny_config(tiny_model, tmp_path)
    # The tiny model needs ~1 GiB on CUDA (mostly runtime overhead): 0.5 GiB is too small, 4 fits, 80 is waste.
    pool, plan = choose_work_pool(config, [WorkPoolSpec(name="gpu-80gb", gpu_gib=80), BIG, SMALL])
    assert pool == BIG and plan.method == "full" and "gpu-big" in plan.budget_source
    assert deployment_for(pool) == "finetune/gpu-big"
    with pytest.raises(PlanError, match="no work pool's GPU fits this run:\n  gpu-small"):
        choose_work_pool(config, [SMALL])
    with pytest.raises(PlanError, match="config.json: not found"):
        choose_work_pool(config.model_copy(update={"model": str(tmp_path)}), [BIG])


def test_the_router_plans_a_preference_run_with_its_reference_and_pairs(tmp_path):
    """A DPO run is routed as what it trains: full DPO's frozen reference copy counted, and a row is a
    pair (both sides, each up to max_seq_len)."""
    import json

    from tasks.config import FinetuneConfig

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}))
    pools = [WorkPoolSpec(name="gpu-48gb", gpu_gib=48)]

    def plan(objective: str):
        config = FinetuneConfig(model=str(tmp_path), data="pairs.jsonl", method="full", objective=objective,
                                training={"max_seq_len": 1024})
        return choose_work_pool(config, pools)[1]

    sft, dpo, orpo = plan("sft"), plan("dpo"), plan("orpo")
    assert dpo.estimate.weights - sft.estimate.weights > 4 * 2**30  # 1.2B parameters again, in fp32
    assert orpo.estimate.weights == sft.estimate.weights  # ORPO has no reference
    assert dpo.longest_row == orpo.longest_row == 2 * sft.longest_row == 2048


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_router_starts_the_run_on_the_chosen_pools_deployment(tiny_model, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.finetune import finetune
    from flows.route import route_finetune

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(finetune)
        ids = {pool.name: client.create_deployment(flow_id=flow_id, name=pool.name, entrypoint="flows/finetune.py:finetune",
                                                   paused=True)  # nothing picks the runs up in this test
               for pool in (SMALL, BIG)}
        config = tiny_config(tiny_model, tmp_path)
        run_id = route_finetune(config, [SMALL, BIG])
        run = client.read_flow_run(run_id)
    assert run.deployment_id == ids["gpu-big"]
    assert run.parameters["config"]["model"] == str(tiny_model)


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_nightly_retrain_skips_unchanged_data(tiny_model, tmp_path):
    from flows.retrain import retrain

    config = tiny_config(tiny_model, tmp_path, method="lora",
                         training={"max_steps": 2, "batch_size": 8, "max_seq_len": 128, "eval_every": 2,
                                   "early_stopping_patience": 0})
    first = retrain(config, return_state=True)
    assert first.is_completed() and first.result().run_id  # trained and published
    second = retrain(config, return_state=True)
    assert second.is_completed() and second.result() is None
    assert "data unchanged since run " + first.result().run_id in second.message
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 1  # nothing trained the second time


@pytest.mark.integration
@pytest.mark.usefixtures("prefect_api")
def test_the_router_reads_a_hub_models_config_with_the_token_secrets_token(tiny_model, tmp_path, monkeypatch):
    """A gated or private model's config.json needs the token on the routing worker too, as in the base_model
    stage: hub.token_secret's, never left to whatever HF_TOKEN the CPU worker has."""
    import huggingface_hub
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.finetune import finetune
    from flows.route import route_finetune
    from hub_cache import add_to_hub_cache, offline_hub_cache

    add_to_hub_cache(offline_hub_cache(tmp_path / "hf-cache", monkeypatch), "tiny-org/tiny-chat", tiny_model,
                     only=("config.json",))
    tokens, real = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **kw: tokens.append(kw["token"]) or real(*a, **kw))
    monkeypatch.setenv("HF_TOKEN", "hf_theRoutingWorkersOwn")
    Secret(value='{"token": "hf_fromTheSecret"}').save("hf-route-token", overwrite=True)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(finetune)
        ids = {pool.name: client.create_deployment(flow_id=flow_id, name=pool.name, entrypoint="flows/finetune.py:finetune",
                                                   paused=True) for pool in (SMALL, BIG)}
        config = tiny_config("tiny-org/tiny-chat", tmp_path, hub={"token_secret": "hf-route-token"})
        run = client.read_flow_run(route_finetune(config, [SMALL, BIG]))
    assert tokens == ["hf_fromTheSecret"] and run.deployment_id == ids["gpu-big"]
    assert run.parameters["config"]["model"] == "tiny-org/tiny-chat"

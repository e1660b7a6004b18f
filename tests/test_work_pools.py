"""The work-pool templates in infra/ render to what the workers need: the Kubernetes job requests
nvidia.com/gpu (count as a job variable), node selector and tolerations."""
import json
import re

from conftest import ROOT

POOLS = ROOT / "infra" / "work-pools"


def render(template: dict, job_variables: dict) -> dict:
    """What a worker does with a pool's template and a deployment's job_variables."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    return apply_values(template["job_configuration"], defaults | job_variables)


def test_kubernetes_template_requests_the_gpus_on_the_gpu_nodes():
    template = json.loads((POOLS / "kubernetes-gpu.json").read_text())
    job = render(template, {"gpu_count": 2, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                            "image": "registry.example/finetune:abc", "command": "python -m prefect.engine"})
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"] == "registry.example/finetune:abc" and pod["restartPolicy"] == "Never"
    assert job["job_manifest"]["spec"]["backoffLimit"] == 0
    # The default is one GPU, and every placeholder is a declared variable (a typo would render as nothing).
    default_pod = render(template, {})["job_manifest"]["spec"]["template"]["spec"]
    assert default_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    used = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    assert used <= set(template["variables"]["properties"]), used - set(template["variables"]["properties"])


def test_process_template_is_prefects_with_the_gpu_pinned():
    from prefect.workers.process import ProcessWorker

    ours = json.loads((POOLS / "process-gpu.json").read_text())
    default = ProcessWorker.get_default_base_job_template()
    assert ours["job_configuration"] == default["job_configuration"]
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"])
    assert render(ours, {})["env"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_both_gpu_templates_let_runs_wait_out_an_api_outage():
    """tests/test_api_restart.py measures what this buys with the process template: a run whose API was
    down ~100 s as it finished is recorded Completed (with Prefect's default of 5 retries it ended Failed)."""
    for name in ("process-gpu.json", "kubernetes-gpu.json"):
        env = render(json.loads((POOLS / name).read_text()), {})["env"]
        assert env["PREFECT_CLIENT_MAX_RETRIES"] == "8", name

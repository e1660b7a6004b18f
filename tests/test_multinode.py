"""The multi-node recipe (infra/multinode/): the work pool's job template renders, with Prefect's own
templating, into an indexed Job whose pods meet in one torchrun rendezvous; and two "nodes" on this
machine (two torchrun agents, c10d rendezvous on 127.0.0.1) train one run together."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from tasks.engine.launch import Nodes, torchrun_command

RECIPE = ROOT / "infra" / "multinode"
TEMPLATE = json.loads((RECIPE / "kubernetes-multinode-job-template.json").read_text())
VALUES = {"image": "registry.example.com/prefect-finetune:gpu", "shared_volume_claim": "finetune-shared",
          "nodes": 3, "gpus_per_node": 4, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"}}


def render(values: dict) -> dict:
    """What a Prefect worker makes of the work pool's template and a deployment's job variables: the
    variables' defaults overlaid with the values, substituted by Prefect's own templating (as
    BaseJobConfiguration.from_template_and_values does, minus block references, which this has none of)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    variables = BaseJobConfiguration._get_base_config_defaults(TEMPLATE["variables"]["properties"])
    return apply_values(TEMPLATE["job_configuration"], {**variables, **values})


def test_the_template_is_a_valid_work_pool_template_and_takes_these_variables():
    import jsonschema
    from prefect.server.schemas.actions import validate_base_job_template

    validate_base_job_template(TEMPLATE)  # what the server checks on `prefect work-pool create`
    jsonschema.validate(VALUES, TEMPLATE["variables"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**VALUES, "nodes": 0}, TEMPLATE["variables"])


def test_the_rendered_job_runs_one_pod_per_node_that_meet_at_pod_0():
    job = render(VALUES)["job_manifest"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert (job["kind"], spec["completionMode"]) == ("Job", "Indexed")
    assert spec["completions"] == spec["parallelism"] == 3 and spec["backoffLimit"] == 0
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4}
    assert container["image"] == VALUES["image"] and pod["nodeSelector"] == VALUES["node_selector"]
    assert "serviceAccountName" not in pod  # unset variables leave no empty fields behind
    # Kubernetes takes only strings as env values
    env = {e["name"]: e for e in container["env"]}
    assert all(isinstance(e.get("value", ""), str) for e in env.values())
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["FINETUNE_RDZV_ENDPOINT"]["value"] == "$(JOB_NAME)-0.finetune-rendezvous:29400"
    assert env["FINETUNE_SHARED_DIR"]["value"] == "/shared"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "finetune-shared"
    assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"  # NCCL's shared memory
    # the headless Service gives pod 0 its name: it selects these pods and is named by their subdomain
    service = yaml.safe_load((RECIPE / "rendezvous-service.yaml").read_text())
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"] == 29400


def pod_environment(rendered: dict, index: int, job_name: str) -> tuple[dict, str]:
    """The environment and command of pod `index`, as Kubernetes and its shell would set them."""
    container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    env = {"JOB_COMPLETION_INDEX": str(index), "JOB_NAME": job_name, "PREFECT__FLOW_RUN_ID": "flow-run-1"}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"].replace("$(JOB_NAME)", job_name)
    script = container["args"][0]
    exports, _, rest = script.partition(";")
    env.update(pair.split("=", 1) for pair in shlex.split(exports)[1:])
    branch = re.search(r"then exec (.*?); else exec (.*?); fi", rest)
    return env, branch.group(1) if index == 0 else branch.group(2)


def test_pod_0_runs_the_flow_and_the_others_join_its_torchrun(monkeypatch):
    rendered = render(VALUES)
    env, command = pod_environment(rendered, 0, "finetune-multinode-x7k2p")
    assert command == "prefect flow-run execute"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    flow_pod = torchrun_command(Nodes.from_environment().job_dir(ROOT) / "job.json", 4, Nodes.from_environment())
    env, command = pod_environment(rendered, 2, "finetune-multinode-x7k2p")
    assert command == "python -m tasks.engine.launch join"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nodes = Nodes.from_environment()
    joiner = torchrun_command(nodes.job_dir(ROOT) / "job.json", int(env["FINETUNE_PROCESSES_PER_NODE"]), nodes)

    def options(command):  # torchrun's own options: between torch.distributed.run and the worker module
        own = command[command.index("torch.distributed.run") + 1:command.index("tasks.engine.worker") - 1]
        return dict(zip(own[::2], own[1::2]))
    assert options(flow_pod)["--node-rank"] == "0" and options(joiner)["--node-rank"] == "2"
    for command in (flow_pod, joiner):  # same rendezvous, same job file (on the shared volume)
        assert {k: v for k, v in options(command).items() if k != "--node-rank" and k != "--rdzv-conf"} == {
            "--nproc-per-node": "4", "--nnodes": "3", "--rdzv-backend": "c10d",
            "--rdzv-endpoint": "finetune-multinode-x7k2p-0.finetune-rendezvous:29400", "--rdzv-id": "flow-run-1"}
        assert command[-1] == "/shared/torchrun/flow-run-1/job.json"
    assert "is_host=true" in options(flow_pod)["--rdzv-conf"] and "is_host=false" in options(joiner)["--rdzv-conf"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_train_one_run_together(tiny_model, tmp_path):
    import logging

    from test_distributed import SEQ, TrainingJob, examples, run_training_processes, write_examples
    from test_distributed import LORA, SETTINGS

    nodes = Nodes(count=2, rank=0, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id="flow-run-2",
                  shared_dir=str(tmp_path / "shared"), join_timeout_s=120)
    folder = nodes.job_dir(tmp_path)
    env = {**os.environ, "FINETUNE_NNODES": "2", "FINETUNE_NODE_RANK": "1", "FINETUNE_PROCESSES_PER_NODE": "1",
           "FINETUNE_RDZV_ENDPOINT": nodes.rdzv_endpoint, "FINETUNE_SHARED_DIR": nodes.shared_dir,
           "FINETUNE_RDZV_JOIN_TIMEOUT": "120", "PREFECT__FLOW_RUN_ID": "flow-run-2"}
    # node 1 starts first and waits at the rendezvous, as pods 1..N-1 do while pod 0 runs the flow
    joiner = subprocess.Popen([sys.executable, "-m", "tasks.engine.launch", "join"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        train_rows, eval_rows = examples(tiny_model)
        job = TrainingJob(model=str(tiny_model), method="lora", device="cpu", lora=LORA, training=SETTINGS,
                          gradient_checkpointing=False, token_capacity=2 * SEQ,
                          train_examples=write_examples(train_rows, folder / "train.jsonl"),
                          eval_examples=write_examples(eval_rows, folder / "eval.jsonl"),
                          best_dir=str(tmp_path / "shared" / "best"), result=str(folder / "result.json"))
        result = run_training_processes(job, folder / "job.json", 1, logging.getLogger("test"), nodes)
        output, _ = joiner.communicate(timeout=120)
    finally:
        joiner.kill()
    assert joiner.returncode == 0, output[-3000:]
    assert result["world_size"] == 2 and result["steps"] == SETTINGS["max_steps"]
    assert (tmp_path / "shared" / "best" / "adapter_model.safetensors").is_file()

"""deployments/prefect.yaml points at the real flow, and its parameters pass the flow's schema."""
import yaml

from conftest import ROOT


def test_deployment_entrypoint_and_parameters_are_valid():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "finetune"
        validated = flow.validate_parameters(deployment["parameters"])
        assert validated["config"].method == deployment["parameters"]["config"]["method"]

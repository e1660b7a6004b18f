"""A run's page in a real browser shows its training progress, the loss curve as an image and the links to the
published run and its model card.

One real flow run (tiny model, S3 output on moto) against the local stack's `prefect server start`, then
headless Chromium (as in tests/test_ui_run_form.py; only 127.0.0.1 is reachable) opens the run's Artifacts
tab and each artifact's page, in the default UI and the new one (/v2). Screenshots go to
tests/artifacts/run-artifacts*.png for a person to look at.
"""
from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from local_stack import PYTHON, ROOT, TINY_EVALUATION, TINY_TRAINING, aws_env, base_env
from local_browser import ARTIFACTS, local_page

pytestmark = pytest.mark.integration
KEYS = ("finetune-training-progress", "finetune-loss-curve", "finetune-run", "finetune-model-card")
RUN = ("import json, sys\nfrom flows.finetune import finetune\nfrom tasks.config import FinetuneConfig\n"
       "state = finetune(FinetuneConfig(**json.loads(sys.argv[1])), return_state=True)\n"
       "print('FLOW_RUN', state.state_details.flow_run_id, state.type.value)\n")


@pytest.fixture(scope="module")
def finished_run(prefect_server, moto_endpoint, tiny_model, stack_dir) -> dict:
    import boto3

    env = base_env(stack_dir / "prefect-home") | aws_env(moto_endpoint) | {"PREFECT_API_URL": prefect_server}
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="ui-artifacts")
    config = {"model": str(tiny_model), "data": str(ROOT / "demo" / "data" / "train.jsonl"),
              "eval_data": str(ROOT / "demo" / "data" / "eval.jsonl"), "method": "lora",
              "output": "s3://ui-artifacts/models", "work_dir": str(stack_dir / "ui-artifacts-work"),
              "training": TINY_TRAINING, "evaluation": TINY_EVALUATION}
    done = subprocess.run([PYTHON, "-c", RUN, json.dumps(config)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    line = next((line for line in done.stdout.splitlines() if line.startswith("FLOW_RUN")), "")
    assert done.returncode == 0 and line.endswith("COMPLETED"), done.stdout[-3000:] + done.stderr[-3000:]
    flow_run_id = line.split()[1]
    found = httpx.post(f"{prefect_server}/artifacts/filter", timeout=30,
                       json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    return {"id": flow_run_id, "artifacts": {a["key"]: a for a in found if a["key"] in KEYS}}


def test_the_run_page_shows_progress_the_loss_curve_and_the_links(prefect_server, moto_endpoint, finished_run):
    ui, artifacts = prefect_server.removesuffix("/api"), finished_run["artifacts"]
    assert set(artifacts) == set(KEYS)
    with local_page() as (page, _):
        for prefix, name in (("", "run-artifacts"), ("/v2", "run-artifacts-v2")):
            page.goto(f"{ui}{prefix}/runs/flow-run/{finished_run['id']}", wait_until="networkidle",
                      timeout=120_000)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("finetune-loss-curve").first.wait_for(timeout=60_000)
            # the progress artifact's description on its card (the cards fill in as their queries answer)
            page.get_by_text("training: 2 of 2 steps").first.wait_for(timeout=60_000)
            tab = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
            assert all(key in tab for key in KEYS), tab[:2000]

            page.goto(f"{ui}{prefix}/artifacts/artifact/{artifacts['finetune-loss-curve']['id']}",
                      wait_until="networkidle", timeout=120_000)
            image = page.locator("img[src^='data:image/png;base64,']").first
            image.wait_for(timeout=60_000)
            assert image.evaluate("img => img.complete && img.naturalWidth") == 800  # the PNG decoded
            page.screenshot(path=str(ARTIFACTS / f"{name}-loss-curve.png"))

            page.goto(f"{ui}{prefix}/artifacts/artifact/{artifacts['finetune-training-progress']['id']}",
                      wait_until="networkidle", timeout=120_000)
            page.get_by_text("Progress: 100%").first.wait_for(timeout=60_000)

            page.goto(f"{ui}{prefix}/artifacts/artifact/{artifacts['finetune-model-card']['id']}",
                      wait_until="networkidle", timeout=120_000)
            link = page.locator(f"a[href^='{moto_endpoint}']").first
            link.wait_for(timeout=60_000)
            assert link.inner_text().startswith("s3://ui-artifacts/models/runs/")
            card = page.context.request.get(link.get_attribute("href"))  # the presigned URL, as the browser has it
            assert card.status == 200 and "model-index" in card.text()

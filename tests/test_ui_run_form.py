"""The deployment's run form in a real browser, and the server's schema check on a bad parameter.

Headless Chromium (Debian's `chromium`, driven by Playwright without `playwright install`) opens the
local Prefect UI's run form for finetune/gpu registered from deployments/prefect.yaml. Every request
that is not to 127.0.0.1 is blocked (the UI tries one analytics call even offline). The screenshot is
saved to tests/artifacts/run-form.png (the whole form), run-form-method.png (the method dropdown
open) and run-form-data-list.png (`data` switched to a list of sources, one added), with the page's
HTML in run-form.html (tests/artifacts/ is ignored by git), for a person to look at.
"""
from __future__ import annotations

import re
import signal

import httpx
import pytest

from conftest import DEMO_DATA
from local_browser import ARTIFACTS, local_page
from local_stack import (BUCKET, POOL, Api, assert_trained_with_dpo, boto_kwargs, ensure_bucket, published_manifests,
                         start_worker, wait_for)

pytestmark = pytest.mark.integration


def deployment_id(api: str, name: str) -> str:
    answer = httpx.get(f"{api}/deployments/name/{name}", timeout=30)
    answer.raise_for_status()
    return answer.json()["id"]


def test_run_form_shows_the_typed_parameters(prefect_server, deployed):
    ui = prefect_server.removesuffix("/api")
    url = f"{ui}/v2/deployments/deployment/{deployment_id(prefect_server, 'finetune/gpu')}/run"
    with local_page() as (page, blocked):
        page.goto(url, wait_until="networkidle", timeout=120_000)
        page.get_by_text("The causal LM to fine-tune", exact=False).first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        page.screenshot(path=str(ARTIFACTS / "run-form.png"), full_page=True)
        (ARTIFACTS / "run-form.html").write_text(page.content())
        print(f"\nscreenshot: {ARTIFACTS / 'run-form.png'}; blocked: {blocked}")
        # The typed fields with their descriptions, from FinetuneConfig's Field(description=...).
        for expected in ("Method (Optional)", "'auto' picks the best method that fits memory", "Data",
                         "Training data: a local path or s3://bucket/key", "Min Improvement",
                         # the preference objective and its settings (tasks/planning/settings.py)
                         "Objective (Optional)", "'dpo' and 'orpo' learn from preference rows", "Beta (Optional)",
                         "how far the tuned model may move from the reference", "Label Smoothing (Optional)",
                         "labelled the wrong way round", "Orpo Lambda (Optional)", "weight of the odds-ratio term"):
            assert expected.lower() in text.lower(), f"{expected!r} not on the run form:\n{text[:3000]}"
        method_dropdown = _dropdown_options(page, "Method")
        page.screenshot(path=str(ARTIFACTS / "run-form-method.png"))  # the dropdown, open
        assert {"auto", "full", "lora", "qlora"} <= set(method_dropdown), method_dropdown
        _close_dropdown(page)
        assert _dropdown_options(page, "Objective") == ["sft", "dpo", "orpo"]
        _close_dropdown(page)
        sources = _data_source_fields(page)
        page.screenshot(path=str(ARTIFACTS / "run-form-data-list.png"), full_page=True)
        for expected in ("Path", "Hugging Face Hub dataset as hf://datasets/<org>/<name>", "Weight (Optional)",
                         "share of the weighted part of the mix", "Max Rows (Optional)", "Split (Optional)"):
            assert expected.lower() in sources.lower(), f"{expected!r} not in the list's form:\n{sources[:3000]}"


def _dropdown_options(page, title: str) -> list[str]:
    """Open a Literal field's dropdown (a listbox button labelled by the field's title) and read its options."""
    page.get_by_role("button", name=f"Select {title}", exact=True).click()
    options = page.get_by_role("option")
    options.first.wait_for(timeout=30_000)
    return [o.strip() for o in options.all_inner_texts()]


def _close_dropdown(page) -> None:
    page.keyboard.press("Escape")
    page.get_by_role("option").first.wait_for(state="detached", timeout=30_000)


def _data_source_fields(page) -> str:
    """`data` is a path or a list of sources: switch it to the list (the form's only `list` tab), add a source
    and return the form's text with that source's fields."""
    page.get_by_role("tab", name="list", exact=True).click()
    page.get_by_role("button", name=re.compile("add", re.IGNORECASE)).first.click()
    page.get_by_text("share of the weighted part of the mix", exact=False).first.wait_for(timeout=30_000)
    return page.inner_text("body")


def test_a_dpo_run_submitted_from_the_form_trains_and_publishes(prefect_server, deployed, moto_endpoint, stack_dir):
    """A person picks objective dpo in finetune/gpu's run form, points data, eval_data and output at preference
    pairs, sets beta and submits: the run the form created carries those settings, a worker runs it, and the
    published run trained with DPO."""
    import boto3

    s3 = boto3.client("s3", **boto_kwargs(moto_endpoint))
    ensure_bucket(s3, BUCKET)
    pairs = {name: f"s3://{BUCKET}/datasets/form/{name}" for name in ("train.jsonl", "eval.jsonl")}
    for name, uri in pairs.items():
        s3.put_object(Bucket=BUCKET, Key=uri.split("/", 3)[3], Body=(DEMO_DATA / f"preference_{name}").read_bytes())
    api, output = Api(prefect_server), f"s3://{BUCKET}/models/form-dpo"
    dep = api.deployment("finetune/gpu")
    before = {r.id for r in api.runs_of(dep.id)}
    shipped = dep.parameters["config"]
    with local_page() as (page, _):
        page.goto(f"{prefect_server.removesuffix('/api')}/v2/deployments/deployment/{dep.id}/run",
                  wait_until="networkidle", timeout=120_000)
        page.get_by_text("The causal LM to fine-tune", exact=False).first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Select Objective", exact=True).click()
        page.get_by_role("option", name="dpo", exact=True).click()
        for old, new in ((shipped["data"], pairs["train.jsonl"]), (shipped["eval_data"], pairs["eval.jsonl"]),
                         (shipped["output"], output)):
            _text_field_holding(page, old).fill(new)
        page.get_by_label("Beta (Optional)", exact=True).fill("0.5")
        page.screenshot(path=str(ARTIFACTS / "run-form-dpo.png"), full_page=True)
        page.get_by_role("button", name="Submit", exact=True).click()
        # Waited for in the page: its requests pass through this process's route handler (local_page), which
        # Playwright only serves while a call of ours is waiting on the page.
        page.get_by_text("scheduled to start", exact=False).first.wait_for(timeout=60_000)
    [run] = [r for r in api.runs_of(dep.id) if r.id not in before]
    config = run.parameters["config"]
    assert config["objective"] == "dpo" and config["preference"]["beta"] == 0.5
    assert (config["data"], config["eval_data"], config["output"]) == (*pairs.values(), output)
    worker = start_worker("form-worker", POOL, 1, deployed["env"], stack_dir)
    try:
        run = wait_for("the form's run to finish", lambda: (r := api.client.read_flow_run(run.id)).state.is_final()
                       and r, 300, [worker], every_s=2)
    finally:
        worker.stop(signals=(signal.SIGTERM, signal.SIGINT))
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
    [manifest] = published_manifests(s3, BUCKET, "models/form-dpo")
    assert manifest["run"]["flow_run_id"] == str(run.id)
    assert_trained_with_dpo(manifest)


def _text_field_holding(page, value: str):
    """The form's text field that holds `value` (a union field's label does not point at its text box)."""
    fields = [f for f in page.locator("textarea").all() if f.input_value() == value]
    assert len(fields) == 1, f"{len(fields)} text fields hold {value!r}"
    return fields[0]


def test_server_rejects_an_invalid_parameter(prefect_server, deployed):
    """enforce_parameter_schema: a bad value is refused when the run is created, naming the field."""
    dep = deployment_id(prefect_server, "finetune/gpu")
    good = httpx.get(f"{prefect_server}/deployments/{dep}", timeout=30).json()["parameters"]["config"]
    for bad, words in (({**good, "method": "bogus"}, ("bogus", "auto")),
                       ({**good, "publish": {"max_regression": -0.5}}, ("-0.5", "minimum")),
                       ({**good, "training": {"learning_rte": 0.1}}, ("learning_rte",)),
                       ({**good, "data": [{"path": "a.jsonl", "weight": 0}]},
                        ("config.data[0].weight", "minimum of 0"))):
        answer = httpx.post(f"{prefect_server}/deployments/{dep}/create_flow_run",
                            json={"parameters": {"config": bad}}, timeout=30)
        assert answer.status_code == 409, answer.text
        assert all(w in answer.text for w in words), answer.text
    accepted = httpx.post(f"{prefect_server}/deployments/{dep}/create_flow_run",
                          json={"parameters": {"config": good}, "state": {"type": "CANCELLED"}}, timeout=30)
    assert accepted.status_code == 201, accepted.text  # the same request with a valid config is accepted

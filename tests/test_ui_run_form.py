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

import httpx
import pytest

from local_browser import ARTIFACTS, local_page

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
                         "Training data: a local path or s3://bucket/key", "Min Improvement"):
            assert expected.lower() in text.lower(), f"{expected!r} not on the run form:\n{text[:3000]}"
        method_dropdown = _method_options(page)
        page.screenshot(path=str(ARTIFACTS / "run-form-method.png"))  # the dropdown, open
        assert {"auto", "full", "lora", "qlora"} <= set(method_dropdown), method_dropdown
        page.keyboard.press("Escape")
        sources = _data_source_fields(page)
        page.screenshot(path=str(ARTIFACTS / "run-form-data-list.png"), full_page=True)
        for expected in ("Path", "Hugging Face Hub dataset as hf://datasets/<org>/<name>", "Weight (Optional)",
                         "share of the weighted part of the mix", "Max Rows (Optional)", "Split (Optional)"):
            assert expected.lower() in sources.lower(), f"{expected!r} not in the list's form:\n{sources[:3000]}"


def _method_options(page) -> list[str]:
    """Open the `method` dropdown (a listbox button labelled by the field's title) and read its options."""
    page.get_by_role("button", name="Select Method", exact=True).click()
    options = page.get_by_role("option")
    options.first.wait_for(timeout=30_000)
    return [o.strip() for o in options.all_inner_texts()]


def _data_source_fields(page) -> str:
    """`data` is a path or a list of sources: switch it to the list (the form's only `list` tab), add a source
    and return the form's text with that source's fields."""
    page.get_by_role("tab", name="list", exact=True).click()
    page.get_by_role("button", name=re.compile("add", re.IGNORECASE)).first.click()
    page.get_by_text("share of the weighted part of the mix", exact=False).first.wait_for(timeout=30_000)
    return page.inner_text("body")


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

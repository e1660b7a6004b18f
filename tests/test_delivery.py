"""Artifacts are sent without making the run wait on the Prefect API (tasks/reports/delivery.py)."""
import contextvars
import threading
import time

from tasks.reports.delivery import send_within

RUN = contextvars.ContextVar("run")


def test_a_call_that_hangs_costs_the_caller_only_the_deadline():
    released = threading.Event()
    started = time.perf_counter()
    delivery = send_within(lambda: released.wait(30), deadline_s=0.2)
    waited = time.perf_counter() - started
    released.set()
    assert delivery.late and not delivery.sent and waited < 2


def test_the_call_runs_in_the_callers_context_and_its_error_comes_back():
    RUN.set("run-7")
    seen = []
    assert send_within(lambda: seen.append(RUN.get())).sent and seen == ["run-7"]

    def refused():
        raise ConnectionError("API down")

    delivery = send_within(refused)
    assert not delivery.sent and not delivery.late and isinstance(delivery.error, ConnectionError)

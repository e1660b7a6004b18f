"""Artifacts a run can do without, sent so that the run never waits long on the Prefect API.

Prefect's client retries a request through an API outage for minutes (PREFECT_CLIENT_MAX_RETRIES with
exponential backoff: about 8.5 min at the 8 retries the GPU pools set; tests/test_api_restart.py waited so for
one loss-curve artifact). A table or a picture is not worth that: each call runs in a thread of its own, with
the caller's context (Prefect keeps the run and the API URL in context variables), and the caller waits at most
`deadline_s`. A call still waiting then finishes or fails on its own, and its artifact may appear late. No
Prefect import here: the caller passes the call.
"""
from __future__ import annotations

import contextvars
import threading
import time
from dataclasses import dataclass

ARTIFACT_DEADLINE_S = 10.0


@dataclass
class Delivery:
    sent: bool
    seconds: float  # what the caller waited
    error: Exception | None = None  # what the call raised; None when it was sent, or is still waiting (late)

    @property
    def late(self) -> bool:
        return not self.sent and self.error is None


def send_within(call, deadline_s: float = ARTIFACT_DEADLINE_S) -> Delivery:
    """Run `call()` in a daemon thread in this context; wait for it at most `deadline_s`."""
    outcome: dict = {}

    def attempt() -> None:
        try:
            call()
            outcome["sent"] = True
        except Exception as error:  # noqa: BLE001 - reported to the caller, who decides what it costs
            outcome["error"] = error

    started = time.perf_counter()
    thread = threading.Thread(target=contextvars.copy_context().run, args=(attempt,), name="artifact", daemon=True)
    thread.start()
    thread.join(deadline_s)
    return Delivery(sent=outcome.get("sent", False), seconds=time.perf_counter() - started,
                    error=outcome.get("error"))

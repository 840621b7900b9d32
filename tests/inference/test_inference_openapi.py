"""The OpenAPI document describes what is served: schemathesis generates requests from it
(every operation, headers, path parameters and bodies, valid and not) against the live
app under uvicorn, and checks each reply: no 5xx, only documented statuses, documented
content types and headers, bodies matching their schemas.

Bounded for CI (``POI_SCHEMATHESIS_EXAMPLES`` examples per operation, 60 by default); by
hand: ``POI_SCHEMATHESIS_EXAMPLES=5000 .venv/bin/python -m pytest
tests/inference/test_inference_openapi.py`` (the figure is in docs/buyer-api.md).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.inference.connections import server_config
from server.inference.service import create_app
from tests.inference.test_inference import run_dir as run_dir  # noqa: F401 - fixture

EXAMPLES = int(os.environ.get("POI_SCHEMATHESIS_EXAMPLES", "60"))
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def live_schema(run_dir: Path) -> Iterator[Any]:  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(run_dir, workers=1, settle_every=10**9, settle_seconds=3600,
                     pipeline_wait=0.01)
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    server.should_exit = True
    thread.join(60)
    print(f"\nschemathesis: {sum(STATUSES.values())} requests, statuses {dict(STATUSES)}")


def test_every_reply_is_what_the_openapi_says(live_schema: Any) -> None:
    operations = [result.ok() for result in live_schema.get_all_operations()]
    assert len(operations) == 4
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                # A request the schema allows still needs a buyer's signature, which no
                # generator can forge: "schema-valid data is accepted" cannot hold here.
                response = case.call_and_validate(
                    timeout=60, excluded_checks=[positive_data_acceptance])
                STATUSES[response.status_code] += 1
                assert response.status_code < 500

            try:
                check()
            except Unsatisfiable:  # GET /v1/model takes nothing that could be invalid
                assert mode is GenerationMode.NEGATIVE and operation.path == "/v1/model"
    assert sum(STATUSES.values()) >= 4 * EXAMPLES

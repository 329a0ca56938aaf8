"""The OpenAPI document is accurate, and schemathesis fuzzes the running relay against it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from relay.api.app import create_app
from relay.api.openapi import openapi_document
from relay.settings import load_settings
from tests.helpers import running_api
from tests.stack import RELAY_KEY

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_every_route_is_documented_with_its_methods() -> None:
    app = create_app(load_settings(CHAMELAION_API_KEY="x", RELAY_API_KEYS="openapi-test-key-0123"))
    documented = {
        (path, method.upper())
        for path, operations in openapi_document()["paths"].items()
        for method in operations
    }
    served = {
        (route.path, method)
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert documented == served


def test_the_document_is_served(redis_url: str) -> None:
    with running_api(redis_url) as api:
        assert httpx.get(api.url + "/openapi.json").json() == openapi_document()


@pytest.mark.long
def test_schemathesis_finds_no_server_error_and_no_schema_violation(redis_url: str) -> None:
    # Waits (Prefer: wait, a feed's wait) capped at a second: a fuzzed wait=60 on a job no
    # worker ends would hold the run for a minute.
    with running_api(redis_url, RELAY_MAX_WAIT="1") as api:
        result = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                api.url + "/openapi.json",
                "--header",
                f"x-api-key: {RELAY_KEY}",
                "--max-examples",
                "30",
                "--seed",
                "20261121",
                "--checks",
                "all",
                # A schema cannot say which callback hosts resolve or which IP spellings the
                # network policy refuses, so some schema-valid bodies are rightly refused.
                "--exclude-checks",
                "positive_data_acceptance",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert result.returncode == 0, result.stdout[-8000:]

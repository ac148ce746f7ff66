"""Schemathesis against the running cloud service's OpenAPI: no 5xx, no crash.

Every operation is fuzzed with valid (positive) and invalid (negative) requests
with an admin token (to reach the handlers), and with valid ones without a
token (to hit the auth layer), against the real service (uvicorn, SQLite, broker session) from the
``cloud`` fixture. Bounded: a fixed number of examples per combination.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from cloud.pki import CertificateAuthority

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = 10


def test_openapi_fuzz_finds_no_server_error(cloud: Any) -> None:
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    # With a CA, enrollment answers 401/422 instead of "no CA yet" (503).
    CertificateAuthority.init(cloud.settings.data_dir / "pki")
    schema = schemathesis.openapi.from_url(f"{cloud.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    seen: dict[int, int] = {}
    failures: list[str] = []
    session = requests.Session()  # one keep-alive connection for all requests
    combos = [
        (GenerationMode.POSITIVE, "admin"),
        (GenerationMode.NEGATIVE, "admin"),
        (GenerationMode.POSITIVE, None),
    ]
    for op in operations:
        for mode, role in combos:
            try:
                _fuzz(
                    cloud,
                    session,
                    op.as_strategy(generation_mode=mode),
                    cloud.headers(role) if role else {},
                    seen,
                    not_a_server_error,
                )
            except (Exception, BaseExceptionGroup) as e:  # collect all failures, then report
                failures.append(
                    f"{op.method.upper()} {op.path} ({mode.value}, "
                    f"{role or 'no token'}): {str(e)[:600]}"
                )
    assert not failures, "server errors:\n" + "\n".join(failures)
    assert any(400 <= s < 500 for s in seen), seen  # invalid requests were refused ...
    assert any(s < 300 for s in seen), seen  # ... and valid ones reached the handlers
    health = httpx.get(f"{cloud.url}/healthz", timeout=10)  # the service survived
    assert health.status_code == 200 and health.json()["broker_connected"] is True


def _fuzz(
    cloud: Any,
    session: Any,
    strategy: Any,
    headers: dict[str, str],
    seen: dict[int, int],
    check: Any,
) -> None:
    # No shrinking: the first failing request is reported as found, in bounded time.
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=cloud.url, session=session, headers=headers, timeout=15)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[check])
        assert response.status_code < 500, (case.method, case.path, response.text[:300])

    try:
        run()
    except Unsatisfiable:
        # No invalid request exists for an operation without inputs (GET /healthz).
        seen[-1] = seen.get(-1, 0) + 1


def _int_params(op: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        p
        for p in op.get("parameters", [])
        if p.get("in") in ("path", "query") and p.get("schema", {}).get("type") == "integer"
    ]


def test_integer_parameters_out_of_range_are_not_server_errors(cloud: Any) -> None:
    """Deterministic edge of the fuzzing above: 64-bit overflow in every integer
    path or query parameter (SQLite and PostgreSQL both stop at 2**63 - 1)."""
    spec = httpx.get(f"{cloud.url}/openapi.json", timeout=10).json()
    failures = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for param in _int_params(op):
                for value in (2**63, -(2**63) - 1, 10**30):
                    url_path = path
                    query: dict[str, Any] = {}
                    for p in op.get("parameters", []):
                        filler = (
                            value
                            if p is param
                            else (1 if p.get("schema", {}).get("type") == "integer" else "x")
                        )
                        if p.get("in") == "path":
                            url_path = url_path.replace("{" + p["name"] + "}", str(filler))
                        elif p.get("in") == "query" and (p is param or p.get("required")):
                            query[p["name"]] = filler
                    r = httpx.request(
                        method,
                        cloud.url + url_path,
                        params=query,
                        headers=cloud.headers("admin"),
                        timeout=15,
                    )
                    if r.status_code >= 500:
                        failures.append(f"{method.upper()} {url_path} {query} -> {r.status_code}")
    assert not failures, "server errors on out-of-range integers:\n" + "\n".join(failures)

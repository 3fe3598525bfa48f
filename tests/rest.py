"""REST through the stack's edge (Envoy's JSON transcoding), one way for every test."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from cex_stack.supervisor import Stack

__all__ = ["rest", "rest_ok"]


def rest(
    stack: Stack,
    path: str,
    token: str | None = None,
    body: object = None,
    *,
    method: str | None = None,
    timeout_s: float = 30.0,
) -> tuple[int, Any]:
    """The HTTP status and the answer of `method` (POST with a body, else GET) on
    `path` at the edge: JSON decoded, or the text of an answer that is not JSON
    (Envoy's own). An error status is an answer here, not an exception."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"http://{stack.edge}{path}",
        method=method,
        headers=headers,
        data=None if body is None else json.dumps(body).encode(),
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def rest_ok(
    stack: Stack, path: str, token: str | None = None, body: object = None, **kw: Any
) -> Any:
    """The answer of a call that must succeed (200)."""
    status, answer = rest(stack, path, token, body, **kw)
    assert status == 200, (status, answer)
    return answer

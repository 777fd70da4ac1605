"""Bodies that are not what a route takes: malformed JSON, the wrong shape, the wrong content
type, an empty body. Each gets a 4xx whose message says what was wrong, nothing is written,
and the refusal is audited."""

from __future__ import annotations

import pytest

from tests.cloud.api.conftest import Api

BAD_BODIES = [
    pytest.param(b'{"name": "m1", "task": ', "application/json", "JSON", id="truncated-json"),
    pytest.param(b"{not json}", "application/json", "JSON", id="not-json"),
    pytest.param(b'["a", "list"]', "application/json", "object", id="a-list"),
    pytest.param(b"", "application/json", "body", id="empty"),
    pytest.param(b'{"name": "m1"}', "application/json", "task", id="missing-fields"),
    pytest.param(
        b'{"name": "../etc", "task": "feature-extraction", "teacher_dir": "/tmp"}',
        "application/json",
        "name",
        id="bad-name",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "says"), BAD_BODIES)
def test_a_bad_body_is_refused_with_a_reason_and_nothing_is_written(
    api: Api, body: bytes, content_type: str, says: str
) -> None:
    r = api.client.post(
        "/api/v1/models",
        content=body,
        headers={**api.admin, "Content-Type": content_type},
    )

    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str)
    assert says.lower() in detail.lower(), detail
    assert api.client.get("/api/v1/models", headers=api.admin).json() == []
    audit = api.client.get("/api/v1/audit", headers=api.admin).json()
    items = audit["items"] if isinstance(audit, dict) else audit
    refused = [a for a in items if a["action"] == "POST /api/v1/models"]
    assert refused, items
    assert refused[0]["outcome"] == 422

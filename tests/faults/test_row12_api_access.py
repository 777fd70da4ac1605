"""Row 12: no caller gets past the control API's authentication or scopes, and no input --
per route and caller, or generated from the OpenAPI schema -- ends in a server error."""

from __future__ import annotations

from pathlib import Path

from tests.faults.drills import row12_api_access


def test_no_bypass_and_no_server_error(tmp_path: Path) -> None:
    result = row12_api_access.run(tmp_path)
    figures = result.figures
    assert figures["bypasses"] == 0, result.notes
    assert figures["5xx"] == 0, result.notes
    assert figures["wrong_refusals"] == 0, result.notes
    assert figures["false_refusals"] == 0, result.notes
    assert result.held, result.notes
    # It really called: every route with every kind of caller, and the fuzzer's cases.
    routes, fuzzed = figures["routes"], figures["fuzz_calls"]
    assert isinstance(routes, int)
    assert isinstance(fuzzed, int)
    assert figures["matrix_calls"] == routes * 9
    assert fuzzed > routes

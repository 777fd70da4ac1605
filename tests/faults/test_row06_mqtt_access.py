"""Row 6 of the fault suite: with the broker users and ACL the controller generates per agent,
no stranger gets into the broker (no credentials, a wrong password, a certificate from another
CA) and an agent can neither write another agent's topics nor read them (``#`` included); the
agents themselves keep working with the credentials they got at join (real mosquitto, real
controller and agents as processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import row06_mqtt_access as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_no_unauthorised_mqtt_connection_publish_or_subscription_is_accepted(
    tmp_path: Path,
) -> None:
    result = row.run(tmp_path)
    f = result.figures
    assert f["legit_refused"] == 0, result.notes
    assert f["accepted"] == 0, [n for n in result.notes if "ACCEPTED" in n]
    kinds = {n.split(":", 1)[0] for n in result.notes[1:]}
    assert {"connect", "publish", "subscribe"} <= kinds
    # 6 connections, 8 publishes and 10 subscriptions against one victim: none skipped
    assert f["attempts"] == 24, result.notes
    assert f["unauthorised_accepted"] == f"0/{f['attempts']}"
    assert result.held

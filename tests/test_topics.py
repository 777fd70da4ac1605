"""The MQTT topic tree, as documented for third-party clients."""

from __future__ import annotations

import pytest

from edgefed.common.errors import ConfigError
from edgefed.common.topics import Topics, check_id

INVALID_IDS = ["", "a/b", "a+b", "a#", "$SYS", "x" * 65, "a b", "-a", "a\x00b"]


@pytest.mark.parametrize(
    ("method", "leaf"),
    [
        ("agent_status", "status"),
        ("heartbeat", "heartbeat"),
        ("telemetry", "telemetry"),
        ("desired", "desired"),
        ("commands", "commands"),
        ("agent_infer", "infer"),
    ],
)
def test_agent_topics_follow_the_documented_tree(method: str, leaf: str) -> None:
    topics = Topics("plant-3")

    topic = getattr(topics, method)("a1")

    assert topic == f"edgefed/v1/plant-3/agents/a1/{leaf}"


def test_worker_infer_topic_follows_the_documented_tree() -> None:
    assert Topics("plant-3").worker_infer("gpu") == "edgefed/v1/plant-3/workers/gpu/infer"


def test_shared_worker_subscription_starts_with_share_and_pool() -> None:
    topics = Topics("plant-3")

    shared = topics.worker_infer_shared("gpu")

    assert shared == "$share/gpu/" + topics.worker_infer("gpu")


def test_replies_topic_follows_the_documented_tree() -> None:
    assert Topics("plant-3").replies("cli-1") == "edgefed/v1/plant-3/clients/cli-1/replies"


def test_controller_status_topic_follows_the_documented_tree() -> None:
    assert Topics("plant-3").controller_status() == "edgefed/v1/plant-3/controller/status"


@pytest.mark.parametrize(
    ("method", "leaf"),
    [
        ("all_agent_status", "status"),
        ("all_heartbeats", "heartbeat"),
        ("all_telemetry", "telemetry"),
    ],
)
def test_fleet_wide_filters_put_a_wildcard_in_place_of_the_agent(method: str, leaf: str) -> None:
    assert getattr(Topics("plant-3"), method)() == f"edgefed/v1/plant-3/agents/+/{leaf}"


def test_valid_ids_with_punctuation_are_accepted() -> None:
    assert check_id("Edge_01.a-b") == "Edge_01.a-b"


def test_id_of_64_characters_is_accepted() -> None:
    assert Topics("plant-3").agent_status("x" * 64).endswith("/" + "x" * 64 + "/status")


@pytest.mark.parametrize("bad", INVALID_IDS)
def test_invalid_agent_id_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="agent id"):
        Topics("plant-3").agent_status(bad)


@pytest.mark.parametrize("bad", INVALID_IDS)
def test_invalid_fleet_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="fleet"):
        Topics(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#"])
def test_invalid_worker_pool_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="worker pool"):
        Topics("plant-3").worker_infer_shared(bad)


@pytest.mark.parametrize("bad", ["", "a/b", "c+"])
def test_invalid_client_id_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="client id"):
        Topics("plant-3").replies(bad)


def test_agent_of_returns_the_agent_of_an_agent_topic() -> None:
    topics = Topics("plant-3")

    assert topics.agent_of(topics.heartbeat("a1")) == "a1"


@pytest.mark.parametrize(
    "topic",
    [
        "edgefed/v1/other/agents/a1/status",
        "edgefed/v1/plant-30/agents/a1/status",
        "edgefed/v1/plant-3/agents/a1",
        "edgefed/v1/plant-3/agents//status",
        "edgefed/v1/plant-3/agents/+/status",
        "edgefed/v1/plant-3/workers/gpu/infer",
        "edgefed/v2/plant-3/agents/a1/status",
        "",
    ],
)
def test_agent_of_returns_none_for_foreign_topics(topic: str) -> None:
    assert Topics("plant-3").agent_of(topic) is None

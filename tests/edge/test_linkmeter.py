"""The agent's uplink figures: smoothed RTT from probes, bandwidth from large transfers only,
with the far side's compute and one round trip taken out of a transfer's time."""

from __future__ import annotations

import pytest

from edgefed.common.errors import ConfigError
from edgefed.edge.linkmeter import LinkMeter

MB = 1_000_000


def test_no_figures_until_a_round_trip_was_measured() -> None:
    meter = LinkMeter(min_transfer_bytes=1000)
    meter.observe_transfer(10 * MB, 1.0)

    assert meter.figures() is None  # the wire format needs an RTT
    meter.observe_rtt(20.0)
    figures = meter.figures()
    assert figures is not None
    assert figures.rtt_ms == 20.0
    assert figures.samples == 2


def test_small_transfers_do_not_count_towards_bandwidth() -> None:
    meter = LinkMeter(min_transfer_bytes=64 * 1024)
    meter.observe_rtt(10.0)

    counted = meter.observe_transfer(1000, 0.001)

    assert counted is False
    assert meter.bandwidth_mbps is None


def test_a_large_transfer_gives_bandwidth_without_the_round_trip_and_remote_compute() -> None:
    meter = LinkMeter(min_transfer_bytes=1000)
    meter.observe_rtt(100.0)  # 0.1 s of set-up per transfer

    meter.observe_transfer(10 * MB, 1.1 + 0.2, remote_s=0.2)  # 10 MB in 1 s of transfer

    assert meter.bandwidth_mbps == pytest.approx(80.0)


def test_bandwidth_is_smoothed_not_replaced_by_one_slow_transfer() -> None:
    meter = LinkMeter(min_transfer_bytes=1000, alpha=0.25)
    meter.observe_transfer(10 * MB, 1.0)  # 80 Mbit/s
    meter.observe_transfer(10 * MB, 8.0)  # 10 Mbit/s

    assert meter.bandwidth_mbps == pytest.approx(80 + 0.25 * (10 - 80))


def test_overhead_never_makes_a_transfer_look_instant() -> None:
    meter = LinkMeter(min_transfer_bytes=1000)
    meter.observe_rtt(5000.0)  # a wildly slow probe

    meter.observe_transfer(MB, 1.0)

    assert meter.bandwidth_mbps == pytest.approx(8 / 0.25)  # at least a quarter of wall time


def test_smoothed_rtt_follows_probes() -> None:
    meter = LinkMeter(alpha=0.5)
    for rtt in (10.0, 30.0):
        meter.observe_rtt(rtt)

    assert meter.rtt_ms == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"min_transfer_bytes": 0}, "min_transfer_bytes"), ({"alpha": 0}, "smoothing weight")],
)
def test_bad_settings_are_refused_with_their_name(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LinkMeter(**kwargs)  # type: ignore[arg-type]


def test_bad_samples_are_refused() -> None:
    meter = LinkMeter()
    with pytest.raises(ValueError, match="round trip"):
        meter.observe_rtt(float("nan"))
    with pytest.raises(ValueError, match="transfer"):
        meter.observe_transfer(-1, 1.0)

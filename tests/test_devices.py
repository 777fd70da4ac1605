"""Device profiles: the built-in ones are honest about where their factors come from, names
resolve (measured profiles first), and an agent's measured report becomes a profile."""

from __future__ import annotations

import pydantic
import pytest

from edgefed.common.devices import (
    BUILTIN_PROFILES,
    DeviceProfile,
    DeviceProfileError,
    MeasuredDeviceReport,
    UnknownDeviceProfile,
    load_profile,
    profile_from_report,
    profile_names,
)
from edgefed.common.errors import ConfigError, PermanentError

REQUIRED = ("jetson-orin-nano", "jetson-nano", "raspberry-pi-5", "x86-nuc", "cloud-cpu")


def test_builtin_profiles_cover_the_device_classes_and_explain_their_factors() -> None:
    for name in REQUIRED:
        profile = load_profile(name)
        assert profile.name == name
        assert profile.speed_factor > 0
        assert profile.memory_bytes > 0
        assert profile.providers
        # Built-in factors are estimates or citations, never passed off as measured; they say why.
        assert profile.source in {"estimated", "cited"}
        assert len(profile.note) > 80
    assert set(REQUIRED) <= set(profile_names())
    assert load_profile("reference").speed_factor == 1.0


def test_builtin_factors_order_the_devices_as_their_hardware_does() -> None:
    factor = {name: load_profile(name).speed_factor for name in REQUIRED}
    # A Cortex-A57 Jetson Nano is the slowest; a cloud worker is faster than any edge device.
    assert factor["jetson-nano"] == max(factor.values())
    assert factor["cloud-cpu"] == min(factor.values())
    assert factor["jetson-nano"] > factor["raspberry-pi-5"] > factor["x86-nuc"]


def test_unknown_profile_name_is_a_config_error_listing_the_known_names() -> None:
    with pytest.raises(UnknownDeviceProfile, match="unknown device profile 'jetson-tx9'") as info:
        load_profile("jetson-tx9")
    assert isinstance(info.value, ConfigError)
    assert "raspberry-pi-5" in str(info.value)


def test_measured_profiles_take_precedence_over_builtin_ones() -> None:
    measured = DeviceProfile(
        name="jetson-nano", speed_factor=3.3, memory_bytes=2**31, source="measured"
    )
    assert load_profile("jetson-nano", measured={"jetson-nano": measured}) is measured
    assert load_profile("jetson-nano").speed_factor == BUILTIN_PROFILES["jetson-nano"].speed_factor


@pytest.mark.parametrize(
    "fields",
    [
        {"speed_factor": 0},
        {"speed_factor": -2},
        {"speed_factor": float("nan")},
        {"memory_bytes": 0},
        {"source": "guessed"},
        {"name": ""},
    ],
)
def test_invalid_profiles_are_rejected(fields: dict[str, object]) -> None:
    base: dict[str, object] = {
        "name": "dev",
        "speed_factor": 1.5,
        "memory_bytes": 1024,
        "source": "measured",
    }
    with pytest.raises(pydantic.ValidationError):
        DeviceProfile.model_validate(base | fields)


def test_profile_round_trips_through_json() -> None:
    profile = load_profile("raspberry-pi-5")
    assert DeviceProfile.model_validate_json(profile.model_dump_json()) == profile
    assert profile.scale_ms(10.0) == pytest.approx(10.0 * profile.speed_factor)


def _report(**changes: object) -> MeasuredDeviceReport:
    fields: dict[str, object] = {
        "device": "pi5-lab",
        "agent_id": "agent-7",
        "graphs_sha256": {"embed": "a" * 64, "layer0": "b" * 64, "head": "c" * 64},
        "median_ms": {"embed": 0.3, "layer0": 6.0, "head": 0.5},
        "batch": 1,
        "seq": 128,
        "providers": ["CPUExecutionProvider"],
        "memory_bytes": 8 * 2**30,
    }
    return MeasuredDeviceReport.model_validate(fields | changes)


REFERENCE_MS = {"embed": 0.1, "layer0": 2.0, "head": 0.4}
REFERENCE_SHA = {"embed": "a" * 64, "layer0": "b" * 64, "head": "c" * 64}


def test_a_device_report_becomes_a_measured_profile_with_the_median_ratio() -> None:
    profile = profile_from_report(_report(), REFERENCE_MS, REFERENCE_SHA)
    # ratios 3.0, 3.0, 1.25 -> median 3.0
    assert profile.speed_factor == pytest.approx(3.0)
    assert profile.source == "measured"
    assert profile.name == "pi5-lab"
    assert profile.memory_bytes == 8 * 2**30
    assert "agent-7" in profile.note


def test_a_report_of_different_graphs_is_refused() -> None:
    report = _report(graphs_sha256={"embed": "0" * 64, "layer0": "b" * 64, "head": "c" * 64})
    with pytest.raises(DeviceProfileError, match="embed") as info:
        profile_from_report(report, REFERENCE_MS, REFERENCE_SHA)
    assert isinstance(info.value, PermanentError)


def test_a_report_sharing_no_graph_with_the_reference_is_refused() -> None:
    with pytest.raises(DeviceProfileError, match="none of the reference graphs"):
        profile_from_report(_report(), {"other": 1.0}, {"other": "d" * 64})


@pytest.mark.parametrize("ms", [0.0, -1.0, float("inf")])
def test_a_report_with_impossible_times_is_invalid(ms: float) -> None:
    with pytest.raises(pydantic.ValidationError, match="positive and finite"):
        _report(median_ms={"embed": ms})

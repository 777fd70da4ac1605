"""Settings: environment, TOML file, precedence, readable errors, broker URLs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefed.common.errors import ConfigError
from edgefed.common.settings import BrokerAddress, load_settings


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgefed.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- sources


def test_defaults_apply_when_nothing_is_configured() -> None:
    settings = load_settings()

    assert settings.broker_url is None
    assert settings.fleet == "default"
    assert settings.mqtt.keepalive_s == 30


def test_top_level_variable_with_edgefed_prefix_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFED_FLEET", "plant-3")

    settings = load_settings()

    assert settings.fleet == "plant-3"


def test_broker_url_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFED_BROKER_URL", "mqtt://broker.example:1884")

    settings = load_settings()

    assert settings.broker_address().port == 1884


def test_nested_variable_with_double_underscore_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFED_MQTT__KEEPALIVE_S", "15")

    settings = load_settings()

    assert settings.mqtt.keepalive_s == 15


def test_config_file_given_as_argument_is_read(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'fleet = "from-file"\n[mqtt]\nkeepalive_s = 45\n')

    settings = load_settings(path)

    assert settings.fleet == "from-file"
    assert settings.mqtt.keepalive_s == 45


def test_config_file_named_by_edgefed_config_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, 'fleet = "via-env"\n')
    monkeypatch.setenv("EDGEFED_CONFIG", str(path))

    settings = load_settings()

    assert settings.fleet == "via-env"


def test_config_file_argument_wins_over_edgefed_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("EDGEFED_CONFIG", str(write_config(tmp_path / "a", 'fleet = "env"\n')))
    explicit = write_config(tmp_path / "b", 'fleet = "argument"\n')

    settings = load_settings(explicit)

    assert settings.fleet == "argument"


# --------------------------------------------------------------------------- precedence


def test_environment_wins_over_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, "[mqtt]\nkeepalive_s = 45\n")
    monkeypatch.setenv("EDGEFED_MQTT__KEEPALIVE_S", "15")

    settings = load_settings(path)

    assert settings.mqtt.keepalive_s == 15


def test_overrides_win_over_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, 'fleet = "file"\n')
    monkeypatch.setenv("EDGEFED_FLEET", "env")

    settings = load_settings(path, fleet="override")

    assert settings.fleet == "override"


def test_nested_sources_merge_field_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "[mqtt]\nkeepalive_s = 45\nsession_expiry_s = 60\n")
    monkeypatch.setenv("EDGEFED_MQTT__KEEPALIVE_S", "15")

    settings = load_settings(path)

    assert settings.mqtt.keepalive_s == 15
    assert settings.mqtt.session_expiry_s == 60


def test_config_file_wins_over_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[mqtt]\nsession_expiry_s = 60\n")

    settings = load_settings(path)

    assert settings.mqtt.session_expiry_s == 60


# --------------------------------------------------------------------------- errors


def test_invalid_nested_value_names_the_field_and_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEFED_MQTT__KEEPALIVE_S", "soon")

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert "mqtt.keepalive_s" in info.value.message
    assert "EDGEFED_MQTT__KEEPALIVE_S" in info.value.message


def test_out_of_range_value_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFED_MQTT__KEEPALIVE_S", "1")

    with pytest.raises(ConfigError, match="keepalive_s"):
        load_settings()


def test_invalid_fleet_names_the_fleet_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFED_FLEET", "plant/3")

    with pytest.raises(ConfigError, match="EDGEFED_FLEET"):
        load_settings()


def test_unparseable_broker_url_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFED_BROKER_URL", "http://broker.example")

    with pytest.raises(ConfigError, match="EDGEFED_BROKER_URL"):
        load_settings()


def test_invalid_value_in_file_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[mqtt]\nkeepalive_s = 1\n")

    with pytest.raises(ConfigError) as info:
        load_settings(path)

    assert str(path) in info.value.message
    assert "mqtt.keepalive_s" in info.value.message


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(missing)


def test_missing_config_file_named_by_edgefed_config_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFED_CONFIG", str(tmp_path / "nowhere.toml"))

    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        load_settings()


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "fleet = \n[mqtt\n")

    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_unknown_top_level_key_in_file_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'flet = "typo"\n')

    with pytest.raises(ConfigError, match="flet"):
        load_settings(path)


def test_unknown_nested_key_in_file_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[mqtt]\nkeep_alive = 10\n")

    with pytest.raises(ConfigError, match=r"mqtt\.keep_alive"):
        load_settings(path)


def test_backoff_cap_below_initial_delay_is_refused() -> None:
    with pytest.raises(ConfigError, match="backoff_max_s"):
        load_settings(mqtt={"backoff_initial_s": 5.0, "backoff_max_s": 1.0})


def test_backoff_initial_delay_above_default_cap_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGEFED_MQTT__BACKOFF_INITIAL_S", "60")

    with pytest.raises(ConfigError, match="backoff_max_s"):
        load_settings()


def test_backoff_cap_equal_to_initial_delay_is_accepted() -> None:
    settings = load_settings(mqtt={"backoff_initial_s": 2.0, "backoff_max_s": 2.0})

    assert settings.mqtt.backoff_max_s == 2.0


def test_importing_settings_with_invalid_variable_does_not_raise() -> None:
    env = {**os.environ, "EDGEFED_MQTT__KEEPALIVE_S": "not-a-number", "EDGEFED_FLEET": "a/b"}

    result = subprocess.run(
        [sys.executable, "-c", "import edgefed.common.settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- broker address


def test_broker_address_without_url_mentions_edgefed_broker_url() -> None:
    settings = load_settings()

    with pytest.raises(ConfigError, match="EDGEFED_BROKER_URL"):
        settings.broker_address()


def test_mqtt_url_defaults_to_port_1883_without_tls() -> None:
    address = BrokerAddress.parse("mqtt://broker.example")

    assert (address.host, address.port, address.tls) == ("broker.example", 1883, False)


def test_mqtts_url_defaults_to_port_8883_with_tls() -> None:
    address = BrokerAddress.parse("mqtts://broker.example")

    assert (address.host, address.port, address.tls) == ("broker.example", 8883, True)


def test_explicit_port_is_kept() -> None:
    address = BrokerAddress.parse("mqtts://broker.example:9000")

    assert address.port == 9000


def test_credentials_in_url_are_percent_decoded() -> None:
    address = BrokerAddress.parse("mqtt://us%40er:p%3Ass%2Fw@broker.example:1884")

    assert address.username == "us@er"
    assert address.password is not None
    assert address.password.get_secret_value() == "p:ss/w"


def test_password_is_not_shown_in_repr() -> None:
    address = BrokerAddress.parse("mqtt://user:hunter2@broker.example")

    assert "hunter2" not in repr(address)


def test_url_without_credentials_has_no_username() -> None:
    address = BrokerAddress.parse("mqtt://broker.example")

    assert address.username is None
    assert address.password is None


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="scheme"):
        BrokerAddress.parse("http://broker.example:1883")


def test_url_without_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="no host"):
        BrokerAddress.parse("mqtt://:1883")


def test_out_of_range_port_is_refused() -> None:
    with pytest.raises(ConfigError):
        BrokerAddress.parse("mqtt://broker.example:70000")

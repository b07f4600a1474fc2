"""Configuration: TOML file, EDGE_AGENT_* overrides, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.settings import load_settings, redacted_dict
from agent.transport.topics import DeviceTopics


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_file_values_are_read(tmp_path: Path) -> None:
    """Keys from the file land in their sections."""
    s = load_settings(write(tmp_path, 'device_id = "pi-kitchen"\n[mqtt]\nport = 1884\n[model]\nn_ctx = 1024\n'))
    assert (s.device_id, s.mqtt.port, s.model.n_ctx) == ("pi-kitchen", 1884, 1024)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGE_AGENT_<SECTION>__<KEY> wins over the file."""
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "1999")
    monkeypatch.setenv("EDGE_AGENT_DEVICE_ID", "from-env")
    s = load_settings(write(tmp_path, "[mqtt]\nport = 1884\n"))
    assert (s.mqtt.port, s.device_id) == (1999, "from-env")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[mqtt]\nport = 0\n", "mqtt.port"),
        ("[mqtt]\nprot = 1\n", "mqtt.prot: unknown key"),
        ('device_id = "a/b"\n', "device_id"),
        ('device_id = "a+"\n', "device_id"),
        ('[mqtt]\ntopic_prefix = "edge/#"\n', "mqtt.topic_prefix"),
        ("[model]\nn_ctx = 'big'\n", "model.n_ctx"),
        ("[inference]\nmax_queue = -1\n", "inference.max_queue"),
        ("[nonsense]\nx = 1\n", "nonsense: unknown key"),
    ],
)
def test_bad_values_fail_with_the_key_path(tmp_path: Path, text: str, path: str) -> None:
    """Every invalid key is reported with its dotted path."""
    with pytest.raises(ConfigError, match=path.replace("+", r"\+")):
        load_settings(write(tmp_path, text))


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A syntax error says which file and where."""
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_settings(write(tmp_path, "[mqtt\n"))


def test_missing_file_is_an_error_only_when_named(tmp_path: Path) -> None:
    """The default path may be absent (defaults apply); an explicit --config must exist."""
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml", required=True)
    assert load_settings(tmp_path / "nope.toml").mqtt.port == 1883


def test_secrets_are_redacted(tmp_path: Path) -> None:
    """The broker password never appears in printed config."""
    s = load_settings(write(tmp_path, '[mqtt]\nusername = "u"\npassword = "hunter2"\n'))
    assert "hunter2" not in str(redacted_dict(s))


def test_topics_live_under_prefix_and_device() -> None:
    """Every device topic is {prefix}/{device_id}/..."""
    t = DeviceTopics("edge/site1", "pi-1")
    assert t.infer == "edge/site1/pi-1/infer"
    assert t.infer_cancel == "edge/site1/pi-1/infer/cancel"
    assert t.status == "edge/site1/pi-1/status"


def test_configuration_doc_is_current() -> None:
    """docs/configuration.md is generated from the field descriptions (python -m agent.settings_doc)."""
    from agent.settings_doc import render
    from tests.support.daemon import REPO

    assert (REPO / "docs" / "configuration.md").read_text() == render()

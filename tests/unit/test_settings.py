"""Configuration: TOML file, EDGE_AGENT_* overrides, and errors that name the key path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import ConfigError, PermissionDeniedError
from agent.settings import OVERRIDES_FILE_NAME, load_config, load_settings, redacted_dict
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


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "a\x00b", "tab\there", "new\nline", "del\x7f", "c1\x85", "nc\ufffe"])
@pytest.mark.parametrize("key", ["device_id", "groups"])
def test_device_id_and_groups_refuse_what_is_not_one_concrete_topic_level(
    tmp_path: Path, bad: str, key: str
) -> None:
    """A '/' would reach into another device's topics, a wildcard subscribe to them, and a control
    character gets every publish refused by the broker: the daemon does not start with one."""
    value = json.dumps(bad if key == "device_id" else [bad])  # JSON string escapes are TOML's too
    with pytest.raises(ConfigError, match=key):
        load_settings(write(tmp_path, f"{key} = {value}\n"))


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


# -- layers: defaults < file < fleet overrides < environment ------------------------------------------


def layered(tmp_path: Path, file_text: str, overrides_text: str | None = None) -> tuple[Path, Path]:
    """A config file whose fleet.state_dir is under tmp_path, and (optionally) its override layer."""
    state = tmp_path / "state"
    config = write(tmp_path, file_text + f'\n[fleet]\nstate_dir = "{state}"\n')
    layer = state / OVERRIDES_FILE_NAME
    if overrides_text is not None:
        state.mkdir(exist_ok=True)
        layer.write_text(overrides_text)
    return config, layer


def test_each_leaf_key_names_the_layer_it_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overrides win over the file, the environment over both; every leaf key reports its source."""
    config, layer = layered(
        tmp_path,
        'device_id = "pi-1"\n[mqtt]\nport = 1884\nhost = "broker.lan"\n[inference]\nmax_queue = 4\n',
        "[inference]\nmax_queue = 2\n[mqtt]\nport = 1885\n",
    )
    monkeypatch.setenv("EDGE_AGENT_MQTT__PORT", "1999")
    loaded = load_config(config)
    s = loaded.settings
    assert (s.device_id, s.mqtt.host, s.mqtt.port, s.inference.max_queue) == ("pi-1", "broker.lan", 1999, 2)
    assert loaded.sources["device_id"] == f"file:{config}"
    assert loaded.sources["inference.max_queue"] == f"fleet-override:{layer}"
    assert loaded.sources["mqtt.port"] == "env:EDGE_AGENT_MQTT__PORT"
    assert loaded.sources["mqtt.keepalive_s"] == "default"
    assert set(loaded.sources) >= {"log.level", "fleet.state_dir", "hub.token"}
    assert loaded.layer("fleet-override").keys == ("inference.max_queue", "mqtt.port")
    assert loaded.layer("fleet-override").state == "read"


def test_a_json_environment_value_names_its_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole list from one variable (EDGE_AGENT_GROUPS='[...]') is sourced to that variable."""
    config, _ = layered(tmp_path, "")
    monkeypatch.setenv("EDGE_AGENT_GROUPS", '["blue", "red"]')
    loaded = load_config(config)
    assert (loaded.settings.groups, loaded.sources["groups"]) == (["blue", "red"], "env:EDGE_AGENT_GROUPS")


def test_a_bad_override_is_reported_with_its_layer(tmp_path: Path) -> None:
    """A value that no longer validates (after an upgrade, say) names its key and the override file."""
    config, layer = layered(tmp_path, "", "[inference]\nmax_queue = -1\n")
    with pytest.raises(ConfigError, match=rf"inference\.max_queue: .*\[fleet-override:{layer}\]"):
        load_config(config)


def test_a_corrupt_override_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    """Invalid TOML in the layer stops loading with the file's path and the way out."""
    config, layer = layered(tmp_path, "", "[inference\n")
    with pytest.raises(ConfigError, match=f"fleet override file {layer}.*reset-overrides") as info:
        load_config(config, strict_overrides=True)
    assert not isinstance(info.value, PermissionDeniedError)


def test_the_override_layer_may_not_set_its_own_location(tmp_path: Path) -> None:
    """fleet.state_dir in the layer would move it; loading refuses it."""
    config, _ = layered(tmp_path, "", '[fleet]\nstate_dir = "/elsewhere"\n')
    with pytest.raises(ConfigError, match=r"fleet\.state_dir cannot be a fleet override"):
        load_config(config)


def test_a_missing_override_layer_is_empty(tmp_path: Path) -> None:
    """No override file yet (a fresh device): the layer is 'missing' and nothing comes from it."""
    config, layer = layered(tmp_path, "[inference]\nmax_queue = 4\n")
    loaded = load_config(config, strict_overrides=True)
    assert (loaded.layer("fleet-override").state, loaded.overrides_path) == ("missing", layer)
    assert not any(v.startswith("fleet-override") for v in loaded.sources.values())


def _deny(monkeypatch: pytest.MonkeyPatch, denied_path: Path) -> None:
    """Make reading ``denied_path`` fail like it does for a user outside its 0700 directory (tests run as root)."""
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == denied_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)


def test_an_unreadable_override_layer_is_skipped_by_one_shot_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator who may not read the service's state still gets settings; the layer says why it was skipped."""
    config, layer = layered(tmp_path, "[inference]\nmax_queue = 4\n", "[inference]\nmax_queue = 2\n")
    _deny(monkeypatch, layer)
    loaded = load_config(config)
    info = loaded.layer("fleet-override")
    assert (loaded.settings.inference.max_queue, info.state) == (4, "unreadable")
    assert info.detail is not None
    assert info.detail.startswith(f"cannot read {layer}: permission denied (")
    assert "\n" not in info.detail


def test_an_unreadable_override_layer_stops_the_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon must not run without its overrides: strict loading raises PermissionDeniedError."""
    config, layer = layered(tmp_path, "", "[inference]\nmax_queue = 2\n")
    _deny(monkeypatch, layer)
    with pytest.raises(PermissionDeniedError, match=f"cannot read {layer}: permission denied"):
        load_config(config, strict_overrides=True)


def test_an_unreadable_config_file_is_one_line_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused config file is a PermissionDeniedError (exit 77) naming the file, never a bare PermissionError."""
    config = write(tmp_path, "")
    _deny(monkeypatch, config)
    with pytest.raises(PermissionDeniedError, match=f"cannot read {config}: permission denied") as info:
        load_settings(config)
    assert isinstance(info.value, PermissionError)
    assert "\n" not in str(info.value)

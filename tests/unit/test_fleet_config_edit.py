"""config-set: dotted keys validated by the settings schema, persisted atomically, read back by load_settings."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.fleet.config_edit import UNSET, changed_keys, edit_config, get_value, render_toml
from agent.settings import Settings, load_settings

ORIGINAL = 'device_id = "pi-1"\n\n[mqtt]\nport = 1884\n\n[inference]\nmax_queue = 4\n'


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(ORIGINAL)
    path.chmod(0o640)
    return path


def test_good_value_is_persisted_and_survives_a_reload(config: Path) -> None:
    """A valid change is written to the file and load_settings reads it back, other keys untouched."""
    current = load_settings(config)
    change = edit_config(config, {"inference.max_queue": 9}, current=current)
    assert change.changed_keys == ["inference.max_queue"]
    assert change.settings.inference.max_queue == 9
    reloaded = load_settings(config)
    assert (reloaded.inference.max_queue, reloaded.mqtt.port, reloaded.device_id) == (9, 1884, "pi-1")


def test_bad_value_is_refused_with_the_key_path_and_the_file_is_unchanged(config: Path) -> None:
    """An out-of-range or mistyped value raises ConfigError naming the dotted key; nothing is written."""
    current = load_settings(config)
    with pytest.raises(ConfigError, match=r"inference\.max_queue"):
        edit_config(config, {"inference.max_queue": -1}, current=current)
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        edit_config(config, {"mqtt.port": "high"}, current=current)
    assert config.read_text() == ORIGINAL


def test_unknown_key_is_refused(config: Path) -> None:
    """A key the schema does not have is an 'unknown key' error with its path."""
    with pytest.raises(ConfigError, match=r"inference\.max_qeue: unknown key"):
        edit_config(config, {"inference.max_qeue": 3}, current=load_settings(config))


def test_setting_below_a_scalar_is_refused(config: Path) -> None:
    """device_id is a value, so device_id.x cannot be set."""
    with pytest.raises(ConfigError, match="is a value, not a section"):
        edit_config(config, {"device_id.x": 1}, current=load_settings(config))


@pytest.mark.parametrize("key", ["", ".a", "a..b", "a."])
def test_malformed_keys_are_refused(config: Path, key: str) -> None:
    """Empty dotted parts are rejected before anything is validated."""
    with pytest.raises(ConfigError, match="invalid config key"):
        edit_config(config, {key: 1}, current=load_settings(config))


def test_unset_removes_the_key_so_the_default_applies(config: Path) -> None:
    """UNSET deletes the key from the file; the setting falls back to its default."""
    change = edit_config(config, {"mqtt.port": UNSET}, current=load_settings(config))
    assert change.settings.mqtt.port == 1883
    assert "port" not in tomllib.loads(config.read_text())["mqtt"]


def test_write_is_atomic_and_keeps_the_file_mode(config: Path) -> None:
    """The file is replaced by rename (new inode), keeps its permissions, and no temp file is left."""
    inode = config.stat().st_ino
    edit_config(config, {"model.n_ctx": 512}, current=load_settings(config))
    assert config.stat().st_ino != inode
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert sorted(os.listdir(config.parent)) == ["agent.toml"]


def test_missing_file_is_created(tmp_path: Path) -> None:
    """config-set on a device whose config file does not exist yet creates it."""
    path = tmp_path / "new.toml"
    edit_config(path, {"inference.max_queue": 2}, current=Settings())
    assert load_settings(path).inference.max_queue == 2


def test_environment_overrides_still_win_and_are_not_written(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGE_AGENT_* overrides apply to the effective settings but never end up in the file."""
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", "broker.lan")
    change = edit_config(config, {"inference.max_queue": 5}, current=load_settings(config))
    assert change.settings.mqtt.host == "broker.lan"
    assert "host" not in config.read_text()


def test_render_round_trips_strings_lists_and_nested_tables() -> None:
    """The TOML writer's output parses back to the same data, escapes included."""
    doc = {"device_id": 'a"b\\c\nü', "groups": ["blue", "kitchen"], "mqtt": {"port": 1, "tls": True},
           "x": {"y": {"z": 1.5}}}
    assert tomllib.loads(render_toml(doc)) == doc


def test_changed_keys_lists_leaf_paths() -> None:
    """Only the dotted paths whose values differ are reported."""
    old = Settings(device_id="a")
    new = Settings(device_id="b", inference={"max_queue": 1})
    assert changed_keys(old, new) == ["device_id", "inference.max_queue"]


def test_config_get_masks_secrets_and_names_unknown_keys() -> None:
    """Reading a secret returns the mask; an unknown key is an error with the path."""
    settings = Settings(mqtt={"password": "hunter2"})
    assert get_value(settings, "mqtt.password") == "**********"
    assert get_value(settings, "mqtt.port") == 1883
    with pytest.raises(ConfigError, match=r"mqtt\.nope: unknown key"):
        get_value(settings, "mqtt.nope")

"""config-set: dotted keys validated by the settings schema, persisted atomically in the fleet override layer."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.fleet.config_edit import UNSET, changed_keys, edit_overrides, get_value, render_toml
from agent.settings import OVERRIDES_FILE_NAME, Settings, load_config, load_settings

BODY = 'device_id = "pi-1"\n\n[mqtt]\nport = 1884\n\n[inference]\nmax_queue = 4\n'


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "agent.toml"
    path.parent.mkdir()
    path.write_text(BODY + f'\n[fleet]\nstate_dir = "{tmp_path / "state" / "fleet"}"\n')
    path.chmod(0o640)
    return path


@pytest.fixture
def overrides(tmp_path: Path) -> Path:
    return tmp_path / "state" / "fleet" / OVERRIDES_FILE_NAME


def edit(config: Path, overrides: Path, changes: dict[str, object]) -> object:
    return edit_overrides(overrides, changes, current=load_settings(config), config_path=config)


def test_good_value_is_persisted_as_an_override_and_survives_a_reload(config: Path, overrides: Path) -> None:
    """A valid change lands in the override layer (not the file); load_settings reads it back, other keys intact."""
    original = config.read_text()
    change = edit_overrides(overrides, {"inference.max_queue": 9}, current=load_settings(config), config_path=config)
    assert change.changed_keys == ["inference.max_queue"]
    assert change.settings.inference.max_queue == 9
    assert change.path == overrides
    assert tomllib.loads(overrides.read_text()) == {"inference": {"max_queue": 9}}
    assert config.read_text() == original
    reloaded = load_config(config)
    assert (reloaded.settings.inference.max_queue, reloaded.settings.mqtt.port, reloaded.settings.device_id) == (
        9, 1884, "pi-1")
    assert reloaded.sources["inference.max_queue"] == f"fleet-override:{overrides}"
    assert change.sources["inference.max_queue"] == f"fleet-override:{overrides}"


def test_bad_value_is_refused_with_the_key_path_and_nothing_is_written(config: Path, overrides: Path) -> None:
    """An out-of-range or mistyped value raises ConfigError naming the dotted key; no layer is written."""
    original = config.read_text()
    with pytest.raises(ConfigError, match=r"inference\.max_queue"):
        edit(config, overrides, {"inference.max_queue": -1})
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        edit(config, overrides, {"mqtt.port": "high"})
    assert not overrides.exists()
    assert config.read_text() == original


def test_a_refused_change_leaves_existing_overrides_as_they_were(config: Path, overrides: Path) -> None:
    """With overrides already present, a bad value changes neither them nor the file."""
    edit(config, overrides, {"inference.max_queue": 6})
    before = overrides.read_text()
    with pytest.raises(ConfigError, match=r"inference\.max_queue"):
        edit(config, overrides, {"inference.max_queue": "lots"})
    assert overrides.read_text() == before


def test_unknown_key_is_refused(config: Path, overrides: Path) -> None:
    """A key the schema does not have is an 'unknown key' error with its path."""
    with pytest.raises(ConfigError, match=r"inference\.max_qeue: unknown key"):
        edit(config, overrides, {"inference.max_qeue": 3})


def test_setting_below_a_scalar_is_refused(config: Path, overrides: Path) -> None:
    """device_id is a value, so device_id.x cannot be set."""
    with pytest.raises(ConfigError, match="is a value, not a section"):
        edit(config, overrides, {"device_id.x": 1})


@pytest.mark.parametrize("key", ["", ".a", "a..b", "a."])
def test_malformed_keys_are_refused(config: Path, overrides: Path, key: str) -> None:
    """Empty dotted parts are rejected before anything is validated."""
    with pytest.raises(ConfigError, match="invalid config key"):
        edit(config, overrides, {key: 1})


def test_the_override_layer_cannot_move_itself(config: Path, overrides: Path) -> None:
    """fleet.state_dir locates the layer, so config-set refuses it and names the file to change instead."""
    with pytest.raises(ConfigError, match=r"fleet\.state_dir cannot be set by config-set"):
        edit(config, overrides, {"fleet.state_dir": "/tmp/elsewhere"})
    assert not overrides.exists()


def test_unset_removes_the_override_so_the_file_value_applies_again(config: Path, overrides: Path) -> None:
    """UNSET deletes the key from the layer: the file's value (not the default) is back; an empty layer is deleted."""
    edit(config, overrides, {"mqtt.port": 1999, "inference.max_queue": 2})
    change = edit(config, overrides, {"mqtt.port": UNSET})
    assert change.settings.mqtt.port == 1884
    assert change.sources["mqtt.port"].startswith("file:")
    assert tomllib.loads(overrides.read_text()) == {"inference": {"max_queue": 2}}
    last = edit(config, overrides, {"inference.max_queue": UNSET})
    assert last.settings.inference.max_queue == 4
    assert not overrides.exists()


def test_unset_of_a_file_value_changes_nothing(config: Path, overrides: Path) -> None:
    """The file belongs to provisioning: removing a key config-set never set leaves the file's value in force."""
    change = edit(config, overrides, {"mqtt.port": UNSET})
    assert (change.settings.mqtt.port, change.changed_keys) == (1884, [])
    assert "port = 1884" in config.read_text()


def test_write_is_atomic_private_and_leaves_no_temp_file(config: Path, overrides: Path) -> None:
    """The layer is replaced by rename (new inode), is 0600 (service state), and no temp file is left."""
    edit(config, overrides, {"model.n_ctx": 1024})
    inode = overrides.stat().st_ino
    edit(config, overrides, {"model.n_ctx": 512})
    assert overrides.stat().st_ino != inode
    assert stat.S_IMODE(overrides.stat().st_mode) == 0o600
    assert sorted(os.listdir(overrides.parent)) == [OVERRIDES_FILE_NAME]


def test_a_missing_config_file_is_never_created(tmp_path: Path) -> None:
    """Without a provisioned file, config-set still persists, into the override layer only."""
    path, layer = tmp_path / "absent.toml", tmp_path / "state" / OVERRIDES_FILE_NAME
    edit_overrides(layer, {"inference.max_queue": 2}, current=Settings(), config_path=path)
    assert not path.exists()
    assert tomllib.loads(layer.read_text()) == {"inference": {"max_queue": 2}}


def test_environment_overrides_still_win_and_are_not_written(
    config: Path, overrides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EDGE_AGENT_* values apply to the effective settings, are never written, and shadow an edit of the same key."""
    monkeypatch.setenv("EDGE_AGENT_MQTT__HOST", "broker.lan")
    monkeypatch.setenv("EDGE_AGENT_INFERENCE__MAX_QUEUE", "3")
    change = edit(config, overrides, {"inference.max_queue": 5})
    assert change.settings.mqtt.host == "broker.lan"
    assert change.settings.inference.max_queue == 3
    assert change.shadowed == ["inference.max_queue"]
    assert "host" not in overrides.read_text()


def test_a_corrupt_override_layer_is_refused_not_overwritten(config: Path, overrides: Path) -> None:
    """A layer that is not TOML names its file; config-set does not paper over it."""
    overrides.parent.mkdir(parents=True)
    overrides.write_text("[inference\n")
    with pytest.raises(ConfigError, match=f"invalid TOML in fleet override file {overrides}"):
        edit(config, overrides, {"inference.max_queue": 5})
    assert overrides.read_text() == "[inference\n"


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

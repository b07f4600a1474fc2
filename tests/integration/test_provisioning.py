"""provisioning/: lint, syntax, the bootstrap script, and real runs against a throwaway Debian target.

The throwaway target is a minimal Debian bookworm made by ``debootstrap`` once and cached under
``/var/cache/edge-agent-tests`` (about 2-3 minutes the first time). Each test mounts it with an
overlay (the cache stays pristine; writes land in ``tmp_path``) inside a private mount namespace,
so nothing is left mounted however the test ends. Ansible reaches it with the
``community.general.chroot`` connection; no systemd runs there, so the role installs and enables
the unit but does not start it (``edge_agent_start_service`` is false when PID 1 is not systemd).

The wheelhouse is built on the controller from this checkout; llama-cpp-python comes from pip's
wheel cache (filled when the project was installed), because compiling it takes 5-55 minutes.
A Hub look-alike on loopback (``tests/support/fake_hub.py``) serves a tiny model, so pre-pulling runs
for real: the chroot shares the host's network namespace.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ansible_output import changed_tasks
from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROVISIONING = ROOT / "provisioning"
BOOTSTRAP = PROVISIONING / "bootstrap.sh"
VENV_BIN = Path(sys.executable).parent
CACHE = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-tests"))
MIRROR = os.environ.get("EDGE_AGENT_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = "python3,systemd,ca-certificates"
BASE_STAMP = f"bookworm minbase {BASE_PACKAGES} v1"


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{VENV_BIN}:{os.environ.get('PATH', '')}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["ANSIBLE_CONFIG"] = str(PROVISIONING / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env.pop("PYTHONPATH", None)
    return env


needs_ansible = pytest.mark.skipif(
    _tool("ansible-playbook") is None, reason="ansible-core missing: pip install -r provisioning/requirements.txt"
)


class TestStaticChecks:
    @needs_ansible
    def test_playbook_syntax(self) -> None:
        """ansible-playbook --syntax-check accepts site.yml with the example inventory."""
        result = subprocess.run(
            [_tool("ansible-playbook"), "--syntax-check", "-i", "inventory.example.ini", "site.yml"],
            cwd=PROVISIONING,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.skipif(_tool("ansible-lint") is None, reason="ansible-lint missing: pip install ansible-lint")
    def test_ansible_lint_production_profile(self) -> None:
        """ansible-lint passes on the production profile with no warning."""
        result = subprocess.run(
            [_tool("ansible-lint"), "--profile", "production", "--nocolor"],
            cwd=PROVISIONING,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 failure(s), 0 warning(s)" in result.stdout + result.stderr

    def test_bootstrap_parses(self) -> None:
        """bash -n finds no syntax error in bootstrap.sh."""
        subprocess.run(["bash", "-n", str(BOOTSTRAP)], check=True, timeout=30)

    @pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing: apt-get install shellcheck")
    def test_bootstrap_shellcheck(self) -> None:
        """shellcheck reports nothing for bootstrap.sh."""
        result = subprocess.run(
            ["shellcheck", "--severity=style", str(BOOTSTRAP)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout

    def test_bootstrap_without_a_model_stops_before_doing_anything(self, tmp_path: Path) -> None:
        """Without --model, bootstrap.sh exits 2 naming the flag and its three forms; nothing is written."""
        (tmp_path / "edge_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
        root = tmp_path / "root"
        root.mkdir()
        result = subprocess.run(
            ["bash", str(BOOTSTRAP), "--root", str(root), "--wheelhouse", str(tmp_path), "--mqtt-host", "b.test"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "--model is required" in result.stderr
        assert "NAME:QUANT" in result.stderr
        assert result.stdout == ""
        assert list(root.iterdir()) == []

    def test_bootstrap_refuses_a_malformed_model(self, tmp_path: Path) -> None:
        """A model that is neither NAME, NAME:QUANT nor an absolute path is refused up front."""
        (tmp_path / "edge_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
        result = subprocess.run(
            ["bash", str(BOOTSTRAP), "--dry-run", "--wheelhouse", str(tmp_path), "--model", "models/x.gguf"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert "--model must be NAME, NAME:QUANT or an absolute path" in result.stderr

    def test_bootstrap_dry_run_changes_nothing(self, tmp_path: Path) -> None:
        """--dry-run against an empty root prints every step it would take and writes nothing."""
        wheel = tmp_path / "edge_agent-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"")
        root = tmp_path / "root"
        root.mkdir()
        result = subprocess.run(
            [
                "bash",
                str(BOOTSTRAP),
                "--dry-run",
                "--root",
                str(root),
                "--wheelhouse",
                str(tmp_path),
                "--device-id",
                "bench-1",
                "--mqtt-host",
                "broker.test",
                "--model",
                "gemma-3-270m-it",
                "--prepull",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "would" in result.stdout
        assert "agent.toml" in result.stdout
        assert "would    edge-agent pull gemma-3-270m-it" in result.stdout
        assert "/usr/local/bin/edge-agent" in result.stdout
        # Neither a fleet key nor --allow-unsigned-commands: a warning, not a failure (inference-only boards).
        assert "will refuse every fleet command" in result.stderr
        assert "--allow-unsigned-commands" in result.stderr
        assert list(root.iterdir()) == []

    def test_bootstrap_refuses_a_private_key_as_the_fleet_public_key(self, tmp_path: Path) -> None:
        """--fleet-pubkey-file given the private key (fleet_key.pem) stops before anything, naming the right file."""
        from agent.fleet.signing import write_keypair

        (tmp_path / "edge_agent-0.1.0-py3-none-any.whl").write_bytes(b"")
        private, public = write_keypair(tmp_path / "keys")
        runs = {
            path.name: subprocess.run(
                ["bash", str(BOOTSTRAP), "--dry-run", "--wheelhouse", str(tmp_path), "--model", "tiny",
                 "--fleet-pubkey-file", str(path)],
                capture_output=True, text=True, timeout=60, check=False,
            )
            for path in (private, public)
        }
        refused, accepted = runs["fleet_key.pem"], runs["fleet_pubkey.pem"]
        assert refused.returncode == 2
        assert "is not a PEM public key" in refused.stderr
        assert "fleet_pubkey.pem" in refused.stderr
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        assert "fleet command" not in accepted.stderr


# --- agent.toml as the role renders it (no target needed) -----------------------------------------

ROLE = PROVISIONING / "roles" / "edge_agent"


def _render_agent_toml(tmp_path: Path, extra_vars: dict[str, object]) -> str:
    """Render the role's agent.toml template with its defaults, vars and ``extra_vars`` on the controller."""
    out = tmp_path / "agent.toml"
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "name": "Render agent.toml",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "become": False,
                    "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
                    "tasks": [
                        {
                            "name": "Render",
                            "ansible.builtin.template": {
                                "src": str(ROLE / "templates" / "agent.toml.j2"),
                                "dest": str(out),
                                "mode": "0644",
                            },
                        }
                    ],
                }
            ]
        )
    )
    (tmp_path / "vars.json").write_text(json.dumps({"ansible_python_interpreter": sys.executable, **extra_vars}))
    result = subprocess.run(
        [_tool("ansible-playbook"), "-i", "localhost,", str(playbook), "-e", f"@{tmp_path / 'vars.json'}"],
        cwd=PROVISIONING,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out.read_text()


def _effective(check_json: str) -> dict:
    """The effective settings from ``edge-agent config check --json`` (under "config" next to sources and layers)."""
    data = json.loads(check_json)
    return data["config"] if "layers" in data else data


def _config_check(path: Path) -> dict:
    """``edge-agent config check --json`` of this checkout on ``path``: the effective settings."""
    result = subprocess.run(
        [_tool("edge-agent"), "config", "check", "--json", "--config", str(path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return _effective(result.stdout)


@needs_ansible
class TestRenderedAgentToml:
    def test_model_and_extra_config_merge_into_one_table_per_section(self, tmp_path: Path) -> None:
        """edge_agent_model NAME:QUANT plus extra [model] keys render ONE [model] table that config check accepts."""
        import tomllib

        text = _render_agent_toml(
            tmp_path,
            {
                "device_id": "bench-1",
                "edge_agent_model": "gemma-3-270m-it:Q8_0",
                "edge_agent_hub_endpoint": "http://hub.test:8080",
                "edge_agent_mqtt_username": "edge",
                "edge_agent_extra_config": {
                    "groups": ["kitchen", "ground-floor"],
                    "model": {"n_batch": 256, "catalog": "/etc/edge-agent/models.toml", "n_ctx": 4096},
                    "mqtt": {"username": None, "client_id": 'bench "one" \\ ünï'},
                    "hub": {"timeout_s": 60.5},
                    "telemetry": {"interval_s": 30, "ha_discovery": True},
                },
            },
        )
        assert len(re.findall(r"(?m)^\[model\]$", text)) == 1, text
        assert len(re.findall(r"(?m)^\[hub\]$", text)) == 1, text
        data = tomllib.loads(text)
        assert data["model"] == {
            "name": "gemma-3-270m-it",
            "quant": "Q8_0",
            "n_ctx": 4096,
            "threads": 0,
            "n_batch": 256,
            "catalog": "/etc/edge-agent/models.toml",
        }
        assert data["groups"] == ["kitchen", "ground-floor"]
        assert "username" not in data["mqtt"]
        assert data["mqtt"]["client_id"] == 'bench "one" \\ ünï'
        assert data["mqtt"]["port"] == 1883
        assert data["mqtt"]["tls"] is False
        assert data["hub"] == {"endpoint": "http://hub.test:8080", "timeout_s": 60.5}
        assert data["telemetry"] == {"interval_s": 30, "ha_discovery": True}
        effective = _config_check(tmp_path / "agent.toml")
        assert effective["model"]["name"] == "gemma-3-270m-it"
        assert effective["model"]["quant"] == "Q8_0"
        assert effective["model"]["n_batch"] == 256
        assert effective["hub"]["endpoint"] == "http://hub.test:8080"

    def test_a_local_file_renders_as_model_path(self, tmp_path: Path) -> None:
        """An absolute path renders [model] path and no name; offline renders [hub] offline = true."""
        import tomllib

        data = tomllib.loads(
            _render_agent_toml(tmp_path, {"edge_agent_model": "/srv/models/tiny.gguf", "edge_agent_hub_offline": True})
        )
        assert data["model"] == {"path": "/srv/models/tiny.gguf", "n_ctx": 2048, "threads": 0}
        assert data["hub"] == {"offline": True}

    def test_fleet_allow_unsigned_renders_only_as_an_explicit_opt_out(self, tmp_path: Path) -> None:
        """No [fleet] table by default (signed commands); edge_agent_fleet_allow_unsigned renders allow_unsigned =
        true, which config check accepts; next to a fleet public key it is left out (the key wins)."""
        import tomllib

        for case in "abc":
            (tmp_path / case).mkdir()
        default = tomllib.loads(_render_agent_toml(tmp_path / "a", {"edge_agent_model": "tiny"}))
        opted_out = tomllib.loads(
            _render_agent_toml(tmp_path / "b", {"edge_agent_model": "tiny", "edge_agent_fleet_allow_unsigned": True})
        )
        keyed = tomllib.loads(
            _render_agent_toml(
                tmp_path / "c",
                {"edge_agent_model": "tiny", "edge_agent_fleet_allow_unsigned": True,
                 "edge_agent_fleet_pubkey_src": "/controller/fleet_pubkey.pem"},
            )
        )
        assert "fleet" not in default
        assert opted_out["fleet"] == {"allow_unsigned": True}
        assert _config_check(tmp_path / "b" / "agent.toml")["fleet"]["allow_unsigned"] is True
        assert "fleet" not in keyed

    def test_deprecated_model_path_still_works(self, tmp_path: Path) -> None:
        """edge_agent_model_path (deprecated) is used when edge_agent_model is empty."""
        import tomllib

        data = tomllib.loads(_render_agent_toml(tmp_path, {"edge_agent_model_path": "/srv/models/tiny.gguf"}))
        assert data["model"]["path"] == "/srv/models/tiny.gguf"
        assert "hub" not in data


# --- the throwaway Debian target -------------------------------------------------------------------


def _target_unavailable() -> str | None:
    """Why a chroot target cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mounts)"
    if platform.system() != "Linux":
        return "needs Linux"
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} missing: apt-get install debootstrap util-linux coreutils"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False)
    if probe.returncode != 0:
        return f"cannot create a mount namespace: {probe.stderr.decode().strip()}"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs"
    return None


def _base_rootfs() -> Path:
    """The cached pristine Debian root (built once, atomically, with a stamp naming its recipe)."""
    arch = platform.machine()
    base = CACHE / f"bookworm-{arch}-minbase"
    stamp = base / ".edge-agent-test-stamp"
    if stamp.is_file() and stamp.read_text() == BASE_STAMP:
        return base
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f"{base.name}.building"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(building), MIRROR],
        check=True,
        capture_output=True,
        timeout=900,
    )
    # As in any image build: no daemon may start inside the chroot (mosquitto's postinst would).
    policy = building / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    (building / "etc/hostname").write_text("edge-test\n")
    stamp_tmp = building / ".edge-agent-test-stamp"
    stamp_tmp.write_text(BASE_STAMP)
    shutil.rmtree(base, ignore_errors=True)
    building.rename(base)
    return base


class Target:
    """An overlay over the cached root, mounted only inside the private mount namespace of each command."""

    def __init__(self, base: Path, work: Path) -> None:
        self.base = base
        self.root = work / "root"
        self.upper = work / "upper"
        self.workdir = work / "overlay-work"
        for d in (self.root, self.upper, self.workdir):
            d.mkdir(parents=True)

    def run(
        self, argv: list[str], timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a controller-side command while the target is mounted (proc, dev, resolv.conf included)."""
        script = (
            "set -eu; mount --make-rprivate /; "
            f"mount -t overlay overlay -o lowerdir={self.base},upperdir={self.upper},workdir={self.workdir} "
            f"{self.root}; "
            f"mount -t proc proc {self.root}/proc; "
            f"mount --rbind /dev {self.root}/dev; "
            f"mount --rbind /sys {self.root}/sys; "
            f"cp /etc/resolv.conf {self.root}/etc/resolv.conf 2>/dev/null || true; "
            'exec "$@"'
        )
        return subprocess.run(
            ["unshare", "--mount", "sh", "-c", script, "sh", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env or _env(),
        )

    def chroot(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command inside the target."""
        return self.run(["chroot", str(self.root), *argv], timeout=timeout)


@pytest.fixture(scope="module")
def base_rootfs() -> Path:
    """The cached Debian bookworm root, or a skip naming what this machine lacks."""
    reason = _target_unavailable()
    if reason:
        pytest.skip(reason)
    return _base_rootfs()


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels for edge-agent and every dependency, built on the controller like an operator would."""
    cached = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if ".whl" not in cached.stdout:
        pytest.skip(
            "no llama-cpp-python wheel in pip's cache: compiling one takes ~20 min "
            "(install the project with pip's cache enabled first)"
        )
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--prefer-binary", "--wheel-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    ".cache",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "__pycache__",
    "build",
    "dist",
    "*.egg-info",
    "wheelhouse",
)


def _recap(output: str) -> dict[str, int]:
    match = re.search(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", output, re.M)
    assert match, output[-3000:]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, match.groups()), strict=True))


def _has_chroot_connection() -> bool:
    return importlib.util.find_spec("ansible_collections.community.general") is not None


# --- real runs against the throwaway Debian --------------------------------------------------------

HUB_REPO = "edge-test/tiny-llama-GGUF"
CATALOG_ON_TARGET = "/srv/edge-test/models.toml"
# Fake secrets: they must never appear in any output (--check --diff included).
MQTT_PASSWORD = "s3cret-mqtt-password-from-vault"  # noqa: S105 - a fake, to grep the output for
HF_TOKEN = "hf_FakeTokenNeverPrinted0123456789"  # noqa: S105 - a fake, to grep the output for
TLS_KEY = "-----BEGIN PRIVATE KEY-----\nFAKE-KEY-MATERIAL-never-printed\n-----END PRIVATE KEY-----\n"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A Hub look-alike on loopback serving one tiny model in two quants."""
    from tests.support.tiny_gguf import write_tiny_llama

    models = tmp_path_factory.mktemp("hub-models")
    files = {
        "tiny-llama-Q8_0.gguf": write_tiny_llama(models / "q8.gguf", tensor_type="Q8_0"),
        "tiny-llama-Q4_0.gguf": write_tiny_llama(models / "q4.gguf", tensor_type="Q4_0"),
    }
    with FakeHub() as fake:
        fake.add_repo(HUB_REPO, files)
        yield fake


def _new_target(base: Path, work: Path) -> Target:
    """An overlay target with a test catalog (pointing at the fake Hub's repo) and a login user 'alice'."""
    target = Target(base, work)
    catalog = target.upper / CATALOG_ON_TARGET.lstrip("/")
    catalog.parent.mkdir(parents=True)
    catalog.write_text(
        f'[models.tiny]\nrepo = "{HUB_REPO}"\nn_ctx = 512\n'
        'files = { Q8_0 = "tiny-llama-Q8_0.gguf", Q4_0 = "tiny-llama-Q4_0.gguf" }\n'
    )
    catalog.chmod(0o644)
    catalog.parent.chmod(0o755)
    added = target.chroot("useradd", "--create-home", "--shell", "/bin/bash", "alice")
    assert added.returncode == 0, added.stderr
    return target


def _inspect(target: Target) -> str:
    """Facts about an installed target as text, one per line, for the tests to grep."""
    script = r"""
        stat -c '%U:%G %a %n' /etc/edge-agent /etc/edge-agent/agent.toml /var/lib/edge-agent \
            /etc/edge-agent/credentials/mqtt_password
        echo "link $(readlink /usr/local/bin/edge-agent)"
        echo "alice groups: $(id -nG alice)"
        dpkg-query -W -f='pkg ${Package} ${Status}\n' libgomp1 libstdc++6 libgcc-s1
        for so in /opt/edge-agent/venv/lib/python3*/site-packages/llama_cpp/lib/*.so*; do
            ldd "$so" | sed "s|^|ldd $(basename "$so"): |"
        done
        find /var/lib/edge-agent/hf-cache -name '*.gguf' -printf 'model %u %p\n'
        echo "models.toml: $(grep -c '^\[model\]$' /etc/edge-agent/agent.toml) model table(s)"
        readlink /etc/systemd/system/multi-user.target.wants/edge-agent.service
        cat /etc/systemd/system/edge-agent.service.d/*.conf
    """
    result = target.chroot("bash", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _assert_installed_for_operators(target: Target, out: str) -> None:
    """What a login user in the operator group sees: the command on PATH and a config they can check."""
    assert "root:edge-agent 750 /etc/edge-agent\n" in out
    assert "root:edge-agent 640 /etc/edge-agent/agent.toml" in out
    assert "link /opt/edge-agent/venv/bin/edge-agent" in out
    assert re.search(r"alice groups: .*\bedge-agent\b", out), out
    as_alice = target.chroot(
        "runuser", "-l", "alice", "-c", "edge-agent config check --json --config /etc/edge-agent/agent.toml"
    )
    assert as_alice.returncode == 0, as_alice.stdout + as_alice.stderr
    assert _effective(as_alice.stdout)["model"]["name"] == "tiny"


def _assert_runtime_libraries(out: str) -> None:
    """libgomp1 and the C++ runtime are installed and every llama.cpp library resolves its dependencies."""
    for package in ("libgomp1", "libstdc++6", "libgcc-s1"):
        assert f"pkg {package} install ok installed" in out
    ldd_lines = [line for line in out.splitlines() if line.startswith("ldd ")]
    assert any("libgomp.so.1 =>" in line for line in ldd_lines), ldd_lines
    assert not [line for line in ldd_lines if "not found" in line], ldd_lines


def _assert_prepulled(out: str) -> None:
    """The model was pulled into the unit's HF_HOME, owned by the service user."""
    pulled = [line for line in out.splitlines() if line.startswith("model ")]
    assert pulled, out
    assert all(line.startswith("model edge-agent /var/lib/edge-agent/hf-cache/") for line in pulled), pulled


@pytest.fixture(scope="module")
def provisioned(base_rootfs: Path, wheelhouse: Path, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The role run twice into a fresh target: first run, then the idempotence run."""
    work = tmp_path_factory.mktemp("role")
    target = _new_target(base_rootfs, work)
    inventory = work / "inventory.ini"
    inventory.write_text(
        "[edge_devices]\n"
        f"bench ansible_host={target.root} ansible_connection=community.general.chroot "
        "ansible_python_interpreter=/usr/bin/python3 device_id=bench-1\n"
    )
    # A snapshot of the checkout: the wheel the role builds must not change between the runs.
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    tls_key = work / "client.key"
    tls_key.write_text(TLS_KEY)
    extra = {
        "edge_agent_source_dir": str(source),
        "edge_agent_wheelhouse": str(wheelhouse),
        "edge_agent_pip_offline": True,
        "edge_agent_build_from_source": False,
        "edge_agent_install_mosquitto": True,
        "edge_agent_mqtt_password": MQTT_PASSWORD,
        "edge_agent_hf_token": HF_TOKEN,
        "edge_agent_tls_key_src": str(tls_key),
        "edge_agent_memory_max": "900M",
        "edge_agent_model": "tiny",
        "edge_agent_hub_endpoint": hub.endpoint,
        "edge_agent_prepull": True,
        "edge_agent_operators": ["alice"],
        "edge_agent_extra_config": {"model": {"catalog": CATALOG_ON_TARGET, "n_batch": 128}},
    }
    (work / "extra.json").write_text(json.dumps(extra))
    playbook = [
        "ansible-playbook",
        "-i",
        str(inventory),
        str(PROVISIONING / "site.yml"),
        "-e",
        f"@{work / 'extra.json'}",
    ]
    runs = []
    for _ in range(2):
        started = time.monotonic()
        result = target.run(playbook, timeout=900)
        seconds = round(time.monotonic() - started, 1)
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
        runs.append({"seconds": seconds, "recap": _recap(result.stdout), "stdout": result.stdout})
    print(f"playbook runs: {[(r['seconds'], r['recap']) for r in runs]}")
    return {"target": target, "playbook": playbook, "runs": runs, "work": work}


@pytest.fixture(scope="module")
def bootstrapped(base_rootfs: Path, wheelhouse: Path, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """bootstrap.sh run twice into a fresh target with every option the system tests use."""
    work = tmp_path_factory.mktemp("bootstrap")
    target = _new_target(base_rootfs, work)
    password = work / "mqtt_password"
    password.write_text(MQTT_PASSWORD)
    token = work / "hf_token"
    token.write_text(HF_TOKEN)
    command = [
        "bash",
        str(BOOTSTRAP),
        "--root",
        str(target.root),
        "--wheelhouse",
        str(wheelhouse),
        "--pip-offline",
        "--device-id",
        "bench-2",
        "--mqtt-host",
        "broker.test",
        "--mqtt-port",
        "1884",
        "--mqtt-password-file",
        str(password),
        "--hf-token-file",
        str(token),
        "--model",
        "tiny:Q4_0",
        "--catalog",
        CATALOG_ON_TARGET,
        "--hub-endpoint",
        hub.endpoint,
        "--prepull",
        "--operator",
        "alice",
        "--reset-overrides",
        "--with-mosquitto",
        "--allow-unsigned-commands",
    ]
    runs = []
    for _ in range(2):
        started = time.monotonic()
        result = target.run(command, timeout=900)
        seconds = round(time.monotonic() - started, 1)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
        runs.append({"seconds": seconds, "stdout": result.stdout, "stderr": result.stderr})
    print(f"bootstrap runs: {[r['seconds'] for r in runs]} s")
    return {"target": target, "command": command, "runs": runs}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's runs count toward its first test
@needs_ansible
@pytest.mark.skipif(
    not _has_chroot_connection(),
    reason="community.general (chroot connection) missing: pip install 'ansible>=12,<13'",
)
class TestPlaybookOnAThrowawayDebian:
    def test_second_run_changes_nothing(self, provisioned: dict) -> None:
        """The first run changes things; the second reports changed=0 (pre-pull included)."""
        first, second = provisioned["runs"]
        assert first["recap"]["changed"] > 0
        assert second["recap"]["changed"] == 0, second["stdout"][-6000:]

    def test_first_install_is_announced_and_timed(self, provisioned: dict) -> None:
        """The llama-cpp-python install says what it costs, runs as an async job, and reports its duration."""
        out = provisioned["runs"][0]["stdout"]
        assert "Installing llama-cpp-python from the prebuilt wheel in the wheelhouse." in out
        assert "Wait for llama-cpp-python, progress on the device in /var/log/edge-agent-install.log" in out
        assert re.search(r"llama-cpp-python installed in \d+:\d\d:\d\d", out), out[-6000:]

    def test_config_has_one_model_table_that_config_check_accepts(self, provisioned: dict) -> None:
        """agent.toml has one [model] table (the model var merged with extra keys), valid for the agent."""
        target = provisioned["target"]
        check = target.chroot("edge-agent", "config", "check", "--json", "--config", "/etc/edge-agent/agent.toml")
        assert check.returncode == 0, check.stdout + check.stderr
        effective = _effective(check.stdout)
        assert effective["device_id"] == "bench-1"
        assert effective["model"]["name"] == "tiny"
        assert effective["model"]["catalog"] == CATALOG_ON_TARGET
        assert effective["model"]["n_batch"] == 128
        assert effective["hub"]["endpoint"].startswith("http://127.0.0.1:")
        assert "models.toml: 1 model table(s)" in _inspect(target)

    def test_operators_runtime_libraries_and_prepull(self, provisioned: dict) -> None:
        """Operators can run edge-agent; libgomp1 & co. are installed and resolve; the model was pre-pulled."""
        target = provisioned["target"]
        out = _inspect(target)
        _assert_installed_for_operators(target, out)
        _assert_runtime_libraries(out)
        _assert_prepulled(out)

    def test_unit_credentials_and_files(self, provisioned: dict) -> None:
        """Enabled unit identical to the repository's, only configured credentials loaded, secrets root-only."""
        target = provisioned["target"]
        out = _inspect(target)
        assert "root:root 600 /etc/edge-agent/credentials/mqtt_password" in out
        assert "edge-agent:edge-agent 700 /var/lib/edge-agent" in out
        assert "/etc/systemd/system/edge-agent.service" in out
        assert "LoadCredential=mqtt_password:/etc/edge-agent/credentials/mqtt_password" in out
        assert "LoadCredential=hf_token:/etc/edge-agent/credentials/hf_token" in out
        assert "LoadCredential=tls_key:/etc/edge-agent/credentials/tls_key" in out
        assert "MemoryMax=900M" in out
        # The fleet key pair was made on the controller next to the inventory; only the public key went over.
        keys = provisioned["work"] / "fleet-key"
        assert (keys / "fleet_key.pem").stat().st_mode & 0o777 == 0o600
        assert "LoadCredential=fleet_pubkey:/etc/edge-agent/credentials/fleet_pubkey" in out
        installed = target.chroot("cat", "/etc/edge-agent/credentials/fleet_pubkey")
        assert installed.stdout == (keys / "fleet_pubkey.pem").read_text()
        private_line = (keys / "fleet_key.pem").read_text().splitlines()[1]
        leaked = target.chroot("grep", "-rlF", "--", private_line, "/etc", "/opt/edge-agent", "/var/lib/edge-agent")
        assert leaked.stdout == "", leaked.stdout
        for secret in (MQTT_PASSWORD, HF_TOKEN, "FAKE-KEY-MATERIAL"):
            assert secret not in out
        installed_unit = target.chroot("cat", "/etc/systemd/system/edge-agent.service")
        assert installed_unit.stdout == (ROOT / "systemd" / "edge-agent.service").read_text()
        verify = target.chroot("systemd-analyze", "verify", "/etc/systemd/system/edge-agent.service")
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    def test_no_secret_in_any_output(self, provisioned: dict) -> None:
        """Neither the runs nor `--check --diff` with changed secrets print a password, token or key."""
        target, work = provisioned["target"], provisioned["work"]
        new_key = work / "client-new.key"
        new_key.write_text(TLS_KEY.replace("FAKE-KEY", "FAKE-KEY-ROTATED"))
        result = target.run(
            [
                *provisioned["playbook"],
                "--check",
                "--diff",
                "-e",
                f"edge_agent_mqtt_password={MQTT_PASSWORD}-rotated",
                "-e",
                f"edge_agent_hf_token={HF_TOKEN}-rotated",
                "-e",
                f"edge_agent_tls_key_src={new_key}",
            ],
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert _recap(result.stdout)["changed"] > 0  # the rotated secrets would be written
        outputs = [result.stdout + result.stderr] + [run["stdout"] for run in provisioned["runs"]]
        for output in outputs:
            for secret in (MQTT_PASSWORD, HF_TOKEN, "FAKE-KEY-MATERIAL", "FAKE-KEY-ROTATED"):
                assert secret not in output

    def test_check_mode_after_a_run_predicts_nothing(self, provisioned: dict) -> None:
        """`--check --diff` right after the runs predicts changed=0: no pip install, no archive copy."""
        result = provisioned["target"].run([*provisioned["playbook"], "--check", "--diff"], timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert _recap(result.stdout)["changed"] == 0, changed_tasks(result.stdout)

    def test_a_changed_checkout_is_reinstalled(self, provisioned: dict) -> None:
        """A source change keeps the version (0.1.0) but changes the wheel the role builds: `--check` predicts the
        reinstall, the run reinstalls it (the venv then holds the new code), the run after that changes nothing."""
        target, work = provisioned["target"], provisioned["work"]
        marker = f"# changed checkout {work.name}"
        init = work / "source" / "agent" / "__init__.py"
        init.write_text(init.read_text() + f"\n{marker}\n")
        installed = "/opt/edge-agent/venv/lib/python3*/site-packages/agent/__init__.py"

        check = target.run([*provisioned["playbook"], "--check", "--diff"], timeout=600)
        assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-3000:]
        predicted = changed_tasks(check.stdout)
        assert "Copy the wheelhouse archive to the device" in predicted, predicted
        assert "Reinstall edge-agent from its rebuilt wheel" in predicted, predicted
        assert target.chroot("sh", "-c", f"grep -c '{marker}' {installed} || true").stdout.strip() == "0"

        run = target.run(provisioned["playbook"], timeout=600)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        done = changed_tasks(run.stdout)
        for task in (
            "Copy the wheelhouse archive to the device",
            "Unpack the wheelhouse on the device",
            "Reinstall edge-agent from its rebuilt wheel",
        ):
            assert task in done, done
        assert target.chroot("sh", "-c", f"grep -c '{marker}' {installed}").stdout.strip() == "1"

        again = target.run(provisioned["playbook"], timeout=600)
        assert again.returncode == 0, again.stdout[-6000:]
        assert _recap(again.stdout)["changed"] == 0, changed_tasks(again.stdout)

    def test_reset_fleet_overrides(self, provisioned: dict) -> None:
        """edge_agent_reset_fleet_overrides deletes the fleet override file via the agent; a rerun is changed=0."""
        target = provisioned["target"]
        has_command = target.chroot("edge-agent", "config", "reset-overrides", "--help")
        if has_command.returncode != 0:
            pytest.skip("edge-agent config reset-overrides is not in this checkout yet")
        overrides = "/var/lib/edge-agent/fleet/config-overrides.toml"
        made = target.chroot(
            "runuser", "-u", "edge-agent", "--", "sh", "-c", f"printf '[inference]\\nmax_queue = 3\\n' > {overrides}"
        )
        assert made.returncode == 0, made.stderr
        playbook = [*provisioned["playbook"], "-e", "edge_agent_reset_fleet_overrides=true"]
        first = target.run(playbook, timeout=600)
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        assert "Reset the fleet config overrides" in first.stdout
        assert _recap(first.stdout)["changed"] >= 1
        assert target.chroot("test", "-e", overrides).returncode != 0
        again = target.run(playbook, timeout=600)
        assert again.returncode == 0, again.stdout[-6000:]
        assert _recap(again.stdout)["changed"] == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's runs count toward its first test
@needs_ansible
@pytest.mark.skipif(
    not _has_chroot_connection(),
    reason="community.general (chroot connection) missing: pip install 'ansible>=12,<13'",
)
class TestPlaybookRefusesBadInventory:
    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            ({}, "edge_agent_model is not set"),
            ({"edge_agent_model": "/srv/models/missing.gguf"}, "is not a file on bench"),
            (
                {"edge_agent_model": "tiny", "edge_agent_operators": ["nobody-here"]},
                "do not exist on bench: nobody-here",
            ),
            (
                {"edge_agent_model": "tiny", "edge_agent_mqtt_ca_src": "files/fleet-ca.crt"},
                "does not exist on the controller",
            ),
        ],
        ids=["no-model", "missing-model-file", "unknown-operator", "missing-ca-file"],
    )
    def test_fails_before_changing_anything(self, base_rootfs: Path, tmp_path: Path, extra: dict, message: str) -> None:
        """A bad inventory fails in the first tasks with a message saying what to set; the target is untouched."""
        target = Target(base_rootfs, tmp_path)
        inventory = tmp_path / "inventory.ini"
        inventory.write_text(
            "[edge_devices]\n"
            f"bench ansible_host={target.root} ansible_connection=community.general.chroot "
            "ansible_python_interpreter=/usr/bin/python3\n"
        )
        (tmp_path / "extra.json").write_text(json.dumps({"edge_agent_build_wheel": False, **extra}))
        result = target.run(
            [
                "ansible-playbook",
                "-i",
                str(inventory),
                str(PROVISIONING / "site.yml"),
                "-e",
                f"@{tmp_path / 'extra.json'}",
            ],
            timeout=300,
        )
        assert result.returncode != 0
        assert message in result.stdout, result.stdout[-4000:]
        assert _recap(result.stdout)["changed"] == 0
        assert not (tmp_path / "upper" / "opt" / "edge-agent").exists()


@pytest.mark.slow
@needs_ansible
@pytest.mark.skipif(
    not _has_chroot_connection(),
    reason="community.general (chroot connection) missing: pip install 'ansible>=12,<13'",
)
class TestPlaybookCheckModeOnANewDevice:
    def test_check_diff_runs_through_and_changes_nothing(
        self, base_rootfs: Path, wheelhouse: Path, tmp_path: Path
    ) -> None:
        """--check --diff on a device never provisioned completes, prints no secret and leaves it untouched."""
        target = _new_target(base_rootfs, tmp_path)
        # Ansible's apt module needs python3-apt for --check (a real run installs it by itself).
        apt = target.chroot(
            "sh", "-c", "apt-get update -qq && apt-get install -y -qq python3-apt >/dev/null", timeout=600
        )
        assert apt.returncode == 0, apt.stderr[-2000:]
        inventory = tmp_path / "inventory.ini"
        inventory.write_text(
            "[edge_devices]\n"
            f"bench ansible_host={target.root} ansible_connection=community.general.chroot "
            "ansible_python_interpreter=/usr/bin/python3\n"
        )
        extra = {
            "edge_agent_wheelhouse": str(wheelhouse),
            "edge_agent_build_wheel": False,
            "edge_agent_pip_offline": True,
            "edge_agent_build_from_source": False,
            "edge_agent_install_mosquitto": True,
            "edge_agent_model": "tiny",
            "edge_agent_operators": ["alice"],
            "edge_agent_prepull": True,
            "edge_agent_reset_fleet_overrides": True,
            "edge_agent_mqtt_password": MQTT_PASSWORD,
            "edge_agent_hf_token": HF_TOKEN,
        }
        (tmp_path / "extra.json").write_text(json.dumps(extra))
        result = target.run(
            [
                "ansible-playbook",
                "-i",
                str(inventory),
                str(PROVISIONING / "site.yml"),
                "-e",
                f"@{tmp_path / 'extra.json'}",
                "--check",
                "--diff",
            ],
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert _recap(result.stdout)["changed"] > 0
        for secret in (MQTT_PASSWORD, HF_TOKEN):
            assert secret not in result.stdout + result.stderr
        assert not (tmp_path / "upper" / "opt" / "edge-agent").exists()
        assert not (tmp_path / "upper" / "etc" / "edge-agent").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the module fixture's runs count toward its first test
class TestBootstrapOnAThrowawayDebian:
    def test_second_run_reports_nothing_to_do(self, bootstrapped: dict) -> None:
        """The first run installs (config, pull, link); the second ends with 'done: 0 change(s)'."""
        first, second = bootstrapped["runs"]
        assert "changed  install /etc/edge-agent/agent.toml" in first["stdout"]
        assert "changed  edge-agent pull tiny:Q4_0" in first["stdout"]
        assert "llama-cpp-python from the prebuilt wheel in the wheelhouse" in first["stdout"]
        assert re.search(r"installed in \d+ min \d+ s", first["stdout"]), first["stdout"]
        assert "ok       model tiny:Q4_0 in the cache" in second["stdout"]
        assert second["stdout"].rstrip().endswith("done: 0 change(s)"), second["stdout"]

    def test_config_check_accepts_the_model_and_hub(self, bootstrapped: dict) -> None:
        """--model NAME:QUANT, --catalog and --hub-endpoint render one [model] and one [hub] table;
        --allow-unsigned-commands renders [fleet] allow_unsigned = true, and the run warned about it."""
        target = bootstrapped["target"]
        check = target.chroot("edge-agent", "config", "check", "--json", "--config", "/etc/edge-agent/agent.toml")
        assert check.returncode == 0, check.stdout + check.stderr
        effective = _effective(check.stdout)
        assert effective["device_id"] == "bench-2"
        assert effective["mqtt"]["port"] == 1884
        assert (effective["model"]["name"], effective["model"]["quant"]) == ("tiny", "Q4_0")
        assert effective["model"]["catalog"] == CATALOG_ON_TARGET
        assert effective["hub"]["endpoint"].startswith("http://127.0.0.1:")
        assert "models.toml: 1 model table(s)" in _inspect(target)
        assert effective["fleet"]["allow_unsigned"] is True
        assert json.loads(check.stdout)["fleet_commands"]["policy"] == "unsigned"
        assert "this device runs UNSIGNED fleet commands" in bootstrapped["runs"][0]["stderr"]

    def test_operators_runtime_libraries_and_prepull(self, bootstrapped: dict) -> None:
        """--operator, the PATH link, libgomp1 & co., and --prepull as the service user, as with the role."""
        target = bootstrapped["target"]
        out = _inspect(target)
        _assert_installed_for_operators(target, out)
        _assert_runtime_libraries(out)
        _assert_prepulled(out)
        assert "Q4_0" in "".join(line for line in out.splitlines() if line.startswith("model "))

    def test_unit_enabled_and_no_secret_printed(self, bootstrapped: dict) -> None:
        """The unit is enabled and verifies; neither run printed a secret; the install log is root-only."""
        target = bootstrapped["target"]
        enabled = target.chroot("test", "-L", "/etc/systemd/system/multi-user.target.wants/edge-agent.service")
        assert enabled.returncode == 0
        verify = target.chroot("systemd-analyze", "verify", "/etc/systemd/system/edge-agent.service")
        assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
        log = target.chroot("stat", "-c", "%U %a", "/var/log/edge-agent-install.log")
        assert log.stdout.strip() == "root 640"
        for run in bootstrapped["runs"]:
            for secret in (MQTT_PASSWORD, HF_TOKEN):
                assert secret not in run["stdout"] + run["stderr"]

    def test_reset_overrides(self, bootstrapped: dict) -> None:
        """--reset-overrides deletes the fleet override file through the agent; the next run has nothing to do."""
        target = bootstrapped["target"]
        if target.chroot("edge-agent", "config", "reset-overrides", "--help").returncode != 0:
            pytest.skip("edge-agent config reset-overrides is not in this checkout yet")
        overrides = "/var/lib/edge-agent/fleet/config-overrides.toml"
        made = target.chroot(
            "runuser", "-u", "edge-agent", "--", "sh", "-c", f"printf '[inference]\\nmax_queue = 3\\n' > {overrides}"
        )
        assert made.returncode == 0, made.stderr
        first = target.run(bootstrapped["command"], timeout=600)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "changed  edge-agent config reset-overrides" in first.stdout
        assert target.chroot("test", "-e", overrides).returncode != 0
        again = target.run(bootstrapped["command"], timeout=600)
        assert again.stdout.rstrip().endswith("done: 0 change(s)"), again.stdout

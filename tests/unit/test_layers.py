"""The import layers and boundaries of agent/ (docs/architecture.md, "Layers"), checked by tools in the normal suite.

The contracts themselves live in pyproject.toml ([tool.importlinter]); these tests run them, add what
import-linter does not check (module cycles through a package's own ``__init__``, file paths under /sys and
/proc), and pin the cost of reading the config.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "agent"

# String literals naming the kernel's pseudo-filesystems that may appear outside agent/hardware: the configurable
# probe roots ([hardware] sys_root/proc_root defaults), which only agent.hardware.probe reads under.
SYS_PROC_ALLOWED = {("agent/settings.py", "/sys"), ("agent/settings.py", "/proc")}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("agent", cache_dir=None)


def test_import_contracts_are_kept() -> None:
    """Every [tool.importlinter] contract (layers, no sibling cycles, who imports paho/llama_cpp/hub/psutil) holds."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_module_imports_itself_through_others(graph: grimp.ImportGraph) -> None:
    """No module of agent/ imports, directly or through others, a module that imports it back."""
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            chain = graph.find_shortest_chain(importer=imported, imported=importer)
            if chain:
                cycles.append(" -> ".join((importer, *chain)))
    assert cycles == []


def _literals(tree: ast.Module) -> list[str]:
    """String constants in ``tree`` other than docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_only_hardware_names_sys_and_proc_paths() -> None:
    """Only agent/hardware reads /sys and /proc: no other module has a string literal that is such a path."""
    found = []
    for path in sorted(AGENT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("agent/hardware/"):
            continue
        for text in _literals(ast.parse(path.read_text(), filename=rel)):
            is_path = text in ("/sys", "/proc") or text.startswith(("/sys/", "/proc/"))
            if is_path and (rel, text) not in SYS_PROC_ALLOWED:
                found.append(f"{rel}: {text!r}")
    assert found == []


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


HEAVY = {"psutil", "paho", "llama_cpp", "huggingface_hub", "httpx2", "agent.hardware.probe", "agent.services"}


@pytest.mark.parametrize(
    "statement",
    ["import agent.settings", "from agent.settings import load_config", "import agent.config.cloud"],
)
def test_reading_the_config_loads_no_io_layer(statement: str) -> None:
    """Importing the configuration loads neither the hardware probe, psutil, the services nor any I/O client."""
    assert _modules_after(statement) & HEAVY == set()


def test_snapshot_types_come_without_the_probe() -> None:
    """agent.hardware.snapshot (the frozen types the policy and fit use) imports neither the probe nor psutil."""
    loaded = _modules_after("import agent.hardware.snapshot")
    assert {"psutil", "agent.hardware.probe"} & loaded == set()

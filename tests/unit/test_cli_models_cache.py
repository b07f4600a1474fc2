"""`edge-agent models ls|rm|prune` over a real Hugging Face cache, filled by the real huggingface_hub client
from the fake Hub (tests/support/fake_hub.py), then read and changed through the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir

from agent.__main__ import main
from agent.catalog.catalog import parse_catalog
from agent.catalog.hub import PARTIAL_SUFFIX
from agent.cli.models_cache import loaded_from_status, scan
from tests.support.broker import Broker
from tests.support.daemon import Client
from tests.support.fake_hub import FakeHub
from tests.support.tiny_gguf import write_tiny_llama

TINY, OTHER, BERT = "acme/tiny-GGUF", "other/thing-GGUF", "someone/bert"
CATALOG = f"""
[models.tiny]
repo = "{TINY}"
files = {{ Q8_0 = "tiny-Q8_0.gguf", Q4_0 = "tiny-Q4_0.gguf" }}
"""


@dataclass
class Cache:
    dir: Path
    catalog: Path
    old: str
    """The commit of tiny's first revision (only its Q8_0 cached; main moved on)."""
    main: str
    sizes: dict[str, int]
    """File name → bytes (tiny-Q8_0.gguf is the newer one)."""

    def config(self, tmp_path: Path, model: str = 'name = "tiny"', port: int = 9) -> Path:
        path = tmp_path / "agent.toml"
        path.write_text(f'device_id = "dev1"\n[mqtt]\nport = {port}\n[hub]\ncache_dir = "{self.dir}"\n'
                        f'[model]\ncatalog = "{self.catalog}"\n{model}\n'
                        f'[fleet]\nstate_dir = "{tmp_path / "state"}"\n')
        return path


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("gguf")
    return {
        "v1": write_tiny_llama(d / "v1.gguf", tensor_type="Q8_0", name="tiny", seed=1).read_bytes(),
        "v2": write_tiny_llama(d / "v2.gguf", tensor_type="Q8_0", name="tiny", seed=2).read_bytes(),
        "q4": write_tiny_llama(d / "q4.gguf", tensor_type="Q4_0", name="tiny").read_bytes(),
        "thing": write_tiny_llama(d / "thing.gguf", tensor_type="Q4_0", name="thing").read_bytes(),
    }


@pytest.fixture
def cache(tmp_path: Path, ggufs: dict[str, bytes]) -> Cache:
    """tiny: an old revision (Q8_0) and main (Q8_0, Q4_0); other/thing (Q4_0); someone/bert (no GGUF)."""
    cache_dir = tmp_path / "hf-cache"
    with FakeHub() as hub:
        old = hub.add_repo(TINY, {"tiny-Q8_0.gguf": ggufs["v1"], "tiny-Q4_0.gguf": ggufs["q4"], "README.md": b"#"})
        hub.add_repo(OTHER, {"thing-Q4_0.gguf": ggufs["thing"]})
        hub.add_repo(BERT, {"config.json": b"{}"})

        def get(repo: str, name: str, revision: str = "main") -> None:
            hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir, endpoint=hub.endpoint)

        get(TINY, "tiny-Q8_0.gguf", old)
        new = hub.commit(TINY, {"tiny-Q8_0.gguf": ggufs["v2"]})
        get(TINY, "tiny-Q8_0.gguf")
        get(TINY, "tiny-Q4_0.gguf")
        get(OTHER, "thing-Q4_0.gguf")
        get(BERT, "config.json")
    (cache_dir / ".edge-agent" / "verified").mkdir(parents=True)  # what HubStore keeps beside the repos
    catalog = tmp_path / "models.toml"
    catalog.write_text(CATALOG)
    sizes = {"tiny-Q8_0.gguf": len(ggufs["v2"]), "tiny-Q4_0.gguf": len(ggufs["q4"]),
             "thing-Q4_0.gguf": len(ggufs["thing"]), "old": len(ggufs["v1"])}
    return Cache(cache_dir, catalog, old, new, sizes)


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def what_is_cached(cache_dir: Path) -> set[tuple[str, str, str]]:
    info = scan_cache_dir(cache_dir)
    return {(repo.repo_id, rev.commit_hash, f.file_name) for repo in info.repos for rev in repo.revisions
            for f in rev.files}


# -- ls --------------------------------------------------------------------------------------------------


def test_ls_lists_repo_file_quant_size_and_revision_of_every_cached_file(
        cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every file huggingface_hub cached is a row: repo, file, quant (the catalog's or the name's), its size,
    its revision with refs; the configured model's files at its revision say so; the total is the cache's."""
    data = run_json(capsys, "models", "ls", "--config", str(cache.config(tmp_path)), "--timeout", "0", "--json")
    rows = {(r["repo"], r["file"], r["revision"]): r for r in data["files"]}
    assert set(rows) == {
        (TINY, "tiny-Q8_0.gguf", cache.old), (TINY, "tiny-Q8_0.gguf", cache.main), (TINY, "tiny-Q4_0.gguf", cache.main),
        (OTHER, "thing-Q4_0.gguf", rows_commit(rows, OTHER)), (BERT, "config.json", rows_commit(rows, BERT)),
    }
    new_q8 = rows[(TINY, "tiny-Q8_0.gguf", cache.main)]
    assert (new_q8["quant"], new_q8["size_bytes"], new_q8["refs"], new_q8["catalog"]) == (
        "Q8_0", cache.sizes["tiny-Q8_0.gguf"], ["main"], ["tiny"])
    assert rows[(TINY, "tiny-Q8_0.gguf", cache.old)]["refs"] == []
    assert rows[(TINY, "tiny-Q8_0.gguf", cache.old)]["size_bytes"] == cache.sizes["old"]
    assert rows[(OTHER, "thing-Q4_0.gguf", rows_commit(rows, OTHER))]["quant"] == "Q4_0"  # from the name
    assert rows[(BERT, "config.json", rows_commit(rows, BERT))]["quant"] is None
    assert {k[1:] for k, r in rows.items() if r["use"] == "configured"} == {
        ("tiny-Q8_0.gguf", cache.main), ("tiny-Q4_0.gguf", cache.main)}
    assert data["total_bytes"] == scan_cache_dir(cache.dir).size_on_disk
    assert data["cache_dir"] == str(cache.dir)
    assert data["warnings"] == []  # the agent's .edge-agent directory is not reported as a broken repo
    assert data["loaded"]["source"] == "config"
    assert "broker not asked" in data["loaded"]["detail"]


def rows_commit(rows: dict, repo: str) -> str:
    (commit,) = {k[2] for k in rows if k[0] == repo}
    return commit


def test_ls_table_names_the_cache_and_the_loaded_source(cache: Cache, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The human table: a header row, one row per file, then the cache's path and size and where 'loaded'
    came from; with the broker unreachable the config's pinned quant is what is loaded."""
    config = cache.config(tmp_path, 'name = "tiny"\nquant = "Q4_0"')
    assert main(["models", "ls", "--config", str(config), "--timeout", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["REPO", "FILE", "QUANT", "SIZE", "REVISION", "USE"]
    q4 = next(line for line in lines if "tiny-Q4_0.gguf" in line)
    assert q4.split()[-1] == "loaded"
    assert lines[-2].startswith(f"cache {cache.dir}: 5 files, ")
    assert lines[-1].startswith("loaded: broker unreachable (no connection to 127.0.0.1:9); "
                                "[model] name = tiny, quant = Q4_0")
    assert lines[-1].endswith("[source: config]")


def test_the_retained_status_names_the_loaded_file_by_gguf_name_and_quant(cache: Cache) -> None:
    """A status 'online, model tiny, quant Q4_0' is the cached file whose GGUF general.name is tiny and whose
    quant is Q4_0; an offline status loads nothing."""
    _, rows, _ = scan(cache.dir, parse_catalog(CATALOG))
    loaded = loaded_from_status({"state": "online", "model": "tiny", "quant": "Q4_0"}, "status of dev1", rows)
    assert loaded.source == "status"
    assert [r.file for r in rows if r.path in loaded.paths] == ["tiny-Q4_0.gguf"]
    thing = loaded_from_status({"state": "online", "model": "thing", "quant": "Q4_0"}, "status of dev1", rows)
    assert [r.repo for r in rows if r.path in thing.paths] == [OTHER]
    offline = loaded_from_status({"state": "offline", "model": "tiny"}, "status of dev1", rows)
    assert offline.paths == frozenset()
    assert "offline, no model loaded" in offline.detail


@pytest.mark.integration
def test_ls_asks_the_broker_for_the_retained_status(cache: Cache, tmp_path: Path, broker: Broker,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """With the broker up, `loaded` is what the device's retained status says (source: status), whatever
    quant the config would suggest; prune keeps it."""
    publisher = Client(broker.port)
    try:
        publisher.publish("edge/dev1/status", {"state": "online", "device_id": "dev1", "model": "thing",
                                               "quant": "Q4_0"}, retain=True)
    finally:
        publisher.close()
    config = str(cache.config(tmp_path, port=broker.port))
    data = run_json(capsys, "models", "ls", "--config", config, "--json")
    assert data["loaded"]["source"] == "status"
    assert data["loaded"]["detail"].startswith(f"retained status of dev1 on 127.0.0.1:{broker.port}: online")
    assert {(r["repo"], r["use"]) for r in data["files"] if r["use"] == "loaded"} == {(OTHER, "loaded")}
    pruned = run_json(capsys, "models", "prune", "--config", config, "--json", "--dry-run")
    assert OTHER not in {r["repo"] for r in pruned["removed"]}
    assert (OTHER, "loaded") in {(r["repo"], r["use"]) for r in pruned["kept"]}


def test_a_missing_cache_is_an_empty_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No cache directory yet (nothing pulled): no rows, exit 0."""
    empty = Cache(tmp_path / "nothing", tmp_path / "models.toml", "", "", {})
    empty.catalog.write_text(CATALOG)
    data = run_json(capsys, "models", "ls", "--config", str(empty.config(tmp_path)), "--timeout", "0", "--json")
    assert (data["files"], data["total_bytes"]) == ([], 0)


# -- prune -----------------------------------------------------------------------------------------------------


def test_prune_dry_run_says_what_it_frees_and_changes_nothing(cache: Cache, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--dry-run: the old revision and the other repo would go (huggingface_hub's expected_freed_size),
    the configured files are kept, and the cache is untouched."""
    before = what_is_cached(cache.dir)
    data = run_json(capsys, "models", "prune", "--config", str(cache.config(tmp_path)), "--timeout", "0",
                    "--json", "--dry-run")
    assert data["dry_run"] is True
    assert {(r["repo"], r["file"]) for r in data["removed"]} == {(TINY, "tiny-Q8_0.gguf"), (OTHER, "thing-Q4_0.gguf")}
    assert data["expected_freed_bytes"] == cache.sizes["old"] + cache.sizes["thing-Q4_0.gguf"]
    assert {(r["file"], r["use"]) for r in data["kept"]} == {("tiny-Q8_0.gguf", "configured"),
                                                            ("tiny-Q4_0.gguf", "configured")}
    assert what_is_cached(cache.dir) == before


def test_prune_removes_what_the_config_does_not_use_and_leaves_other_tools_repos(
        cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """prune: the unused revision and repo are gone (refs and snapshots too), a repo without GGUF files stays."""
    data = run_json(capsys, "models", "prune", "--config", str(cache.config(tmp_path)), "--timeout", "0", "--json")
    assert data["dry_run"] is False
    other = next(r["revision"] for r in data["removed"] if r["repo"] == OTHER)
    assert sorted(data["whole_revisions"]) == sorted([cache.old, other])
    left = what_is_cached(cache.dir)
    assert {(repo, name) for repo, _, name in left} == {
        (TINY, "tiny-Q8_0.gguf"), (TINY, "tiny-Q4_0.gguf"), (BERT, "config.json")}
    assert all(commit != cache.old for _, commit, _ in left)
    assert not (cache.dir / "models--other--thing-GGUF").exists()


def test_prune_with_a_pinned_quant_removes_the_other_quant_file_by_file(
        cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """[model] quant pinned: the main revision keeps its Q8_0 and loses its Q4_0 (delete_files); the
    bytes freed are the removed blobs'."""
    config = cache.config(tmp_path, 'name = "tiny"\nquant = "Q8_0"')
    data = run_json(capsys, "models", "prune", "--config", str(config), "--timeout", "0", "--json")
    assert (TINY, "tiny-Q4_0.gguf") in {(r["repo"], r["file"]) for r in data["removed"]}
    assert data["expected_freed_bytes"] == (cache.sizes["old"] + cache.sizes["thing-Q4_0.gguf"]
                                            + cache.sizes["tiny-Q4_0.gguf"])
    assert {(repo, commit, name) for repo, commit, name in what_is_cached(cache.dir) if repo == TINY} == {
        (TINY, cache.main, "tiny-Q8_0.gguf")}
    assert {r["file"]: r["use"] for r in data["kept"]} == {"tiny-Q8_0.gguf": "loaded"}  # config: pinned = loaded


def test_prune_keeps_an_unfinished_download_for_the_pull_to_resume(
        cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A repo holding a partial download loses its files, not its directory: the partial file stays."""
    partial = cache.dir / "models--other--thing-GGUF" / "blobs" / f"{'ab' * 32}{PARTIAL_SUFFIX}"
    partial.write_bytes(b"x" * 1000)
    data = run_json(capsys, "models", "prune", "--config", str(cache.config(tmp_path)), "--timeout", "0", "--json")
    assert (OTHER, "thing-Q4_0.gguf") in {(r["repo"], r["file"]) for r in data["removed"]}
    assert partial.exists()
    assert OTHER not in {repo for repo, _, _ in what_is_cached(cache.dir)}


# -- rm ----------------------------------------------------------------------------------------------------


def test_rm_name_quant_removes_that_quant_only(cache: Cache, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`rm tiny:Q4_0` removes the one file (its revision keeps the Q8_0); `rm org/repo` removes a whole repo."""
    config = str(cache.config(tmp_path))
    data = run_json(capsys, "models", "rm", "tiny:Q4_0", "--config", config, "--timeout", "0", "--json")
    assert [(r["file"], r["revision"]) for r in data["removed"]] == [("tiny-Q4_0.gguf", cache.main)]
    assert data["expected_freed_bytes"] == cache.sizes["tiny-Q4_0.gguf"]
    assert (TINY, cache.main, "tiny-Q8_0.gguf") in what_is_cached(cache.dir)
    assert (TINY, cache.main, "tiny-Q4_0.gguf") not in what_is_cached(cache.dir)
    run_json(capsys, "models", "rm", OTHER, "--config", config, "--timeout", "0", "--json")
    assert OTHER not in {repo for repo, _, _ in what_is_cached(cache.dir)}


def test_rm_revision_removes_that_revision(cache: Cache, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rm tiny --revision <prefix>` removes that revision only (delete_revisions)."""
    data = run_json(capsys, "models", "rm", "tiny", "--revision", cache.old[:10], "--config",
                    str(cache.config(tmp_path)), "--timeout", "0", "--json")
    assert data["whole_revisions"] == [cache.old]
    assert {commit for repo, commit, _ in what_is_cached(cache.dir) if repo == TINY} == {cache.main}


def test_rm_refuses_the_loaded_model_without_force(cache: Cache, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The loaded file is kept unless --force: exit 2 with the reason, nothing removed."""
    config = str(cache.config(tmp_path, 'name = "tiny"\nquant = "Q4_0"'))
    before = what_is_cached(cache.dir)
    assert main(["models", "rm", "tiny:Q4_0", "--config", config, "--timeout", "0"]) == 2
    assert "is the loaded model" in capsys.readouterr().err
    assert what_is_cached(cache.dir) == before
    assert main(["models", "rm", "tiny:Q4_0", "--config", config, "--timeout", "0", "--force"]) == 0
    assert "removed:" in capsys.readouterr().out


def test_rm_of_something_not_cached_exits_66(cache: Cache, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing matches: exit 66 (not found) with one line naming the target."""
    assert main(["models", "rm", "nope/nothing", "--config", str(cache.config(tmp_path)), "--timeout", "0"]) == 66
    err = capsys.readouterr().err
    assert err.startswith("edge-agent: error: nothing cached matches nope/nothing")
    assert err.count("\n") == 1

"""The pull progress bar on a real pull: HubStore against the fake Hub, the bar drawn by agent/cli/progress.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.catalog.hub import HubStore
from agent.cli.progress import TransferBar
from tests.support.fake_hub import FakeHub, random_bytes

REPO, FILE = "acme/big-GGUF", "big-Q8_0.gguf"


def test_a_pull_draws_one_bar_and_huggingface_hub_draws_none(tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    """A 3 MiB download: our bar ends at 100% with a rate, on its stream; nothing else reaches stderr or stdout
    (huggingface_hub's own bars stay off: the blob is in place when hf_hub_download runs)."""
    data = random_bytes(3 * 2**20, seed=7)
    bar_stream = io.StringIO()
    with FakeHub() as hub, capture_logs():  # the store's log lines are not what this test is about
        hub.add_repo(REPO, {FILE: data})
        store = HubStore(cache_dir=tmp_path / "cache", endpoint=hub.endpoint, retries=1, retry_wait_s=0.01)
        with TransferBar("big:Q8_0", stream=bar_stream, mininterval=0) as bar:
            model = store.pull(REPO, FILE, progress=bar)
        again_stream = io.StringIO()
        with TransferBar("big:Q8_0", stream=again_stream) as again:
            assert store.pull(REPO, FILE, progress=again).from_cache
    assert model.size == len(data)
    final = bar_stream.getvalue().rsplit("\r", 1)[-1]
    assert final.startswith("big:Q8_0: 100%")
    assert "3.00M/3.00M" in final
    assert "B/s]" in final
    assert bar_stream.getvalue().count("\n") == 1
    assert again_stream.getvalue() == ""  # a cache hit transfers nothing and draws nothing
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")

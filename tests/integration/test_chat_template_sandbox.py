"""A chat template comes inside the GGUF file, from whoever made the model: it is rendered sandboxed.

llama-cpp-python renders ``tokenizer.chat_template`` with Jinja2's ``ImmutableSandboxedEnvironment``
and a loader that has no templates. These tests pin that down with hostile templates in real GGUF
files loaded through llama-cpp-python: none can run a command, reach Python internals, read a file
or change the caller's data; each is answered ``bad_request`` and the daemon goes on serving.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.engine.llama import LlamaEngine
from agent.errors import BadRequestError
from tests.support.daemon import Client
from tests.support.tiny_gguf import write_tiny_llama

pytestmark = [pytest.mark.integration]

MESSAGES = [{"role": "user", "content": "hello"}]


def hostile_templates(marker: Path, secret: Path) -> dict[str, str]:
    """Known sandbox escapes, each of which would leave ``marker`` or print ``secret``'s text."""
    run = f"touch {marker}"
    return {
        "os via globals": "{{ cycler.__init__.__globals__.os.system('" + run + "') }}",
        "popen via subclasses": (
            "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
            "{{ c(['touch', '" + str(marker) + "']) }}{% endif %}{% endfor %}"
        ),
        "import via builtins": "{{ lipsum.__globals__['__builtins__']['__import__']('os').system('" + run + "') }}",
        "format string attribute walk": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
        "include a file": "{% include '" + str(secret) + "' %}",
        "import a file": "{% import '" + str(secret) + "' as s %}{{ s }}",
        "open via config": "{{ config.__class__.__init__.__globals__['os'].popen('" + run + "').read() }}",
        "mutate the caller's messages": "{{ messages.append({'role': 'system', 'content': 'x'}) }}"
        "{{ messages[0].update({'content': 'pwned'}) }}",
        "template reference context": "{{ self._TemplateReference__context }}",
        "raise_exception global used as an escape": "{{ raise_exception.__globals__ }}",
    }


def render(engine: LlamaEngine, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """What the template produced, or the error the caller would get (and True): text to search."""
    try:
        tokens = engine.tokenize_chat(messages)
    except BadRequestError as exc:
        assert "chat template" in str(exc)  # noqa: PT017 - the message, not whether it raised, is the point
        return str(exc), True
    return engine._model.detokenize(tokens).decode(errors="replace"), False  # type: ignore[attr-defined]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("TOP-SECRET-CONTENT")
    return path


@pytest.mark.parametrize("name", list(hostile_templates(Path("m"), Path("s"))))
def test_a_hostile_template_in_the_gguf_can_neither_run_code_nor_read_files(
    tmp_path: Path, secret: Path, name: str
) -> None:
    """Loaded through llama-cpp-python, rendering fails with a bad_request (or renders nothing of
    value); no command ran, the secret file's text is nowhere, the caller's messages are unchanged."""
    marker = tmp_path / "pwned"
    template = hostile_templates(marker, secret)[name]
    model = write_tiny_llama(tmp_path / "hostile.gguf", chat_template=template)
    engine = LlamaEngine(model, n_ctx=128, threads=1)
    engine.load()
    messages = [dict(m) for m in MESSAGES]
    try:
        text, refused = render(engine, messages)
    finally:
        engine.close()
    assert "TOP-SECRET" not in text
    assert refused or ("<module" not in text and "<function" not in text), text  # no internals rendered
    assert not marker.exists()
    assert messages == MESSAGES


@pytest.mark.slow
def test_the_daemon_answers_bad_request_for_a_hostile_template_and_keeps_serving(
    tmp_path: Path, start_daemon, client: Client, secret: Path
) -> None:
    """A chat request against a model whose template tries to run a command gets one error reply;
    plain prompts are still served by the same process."""
    marker = tmp_path / "pwned"
    template = hostile_templates(marker, secret)["os via globals"]
    daemon = start_daemon(model_cfg={"chat_template": template})
    reply = client.request("dev1", {"id": "chat", "messages": MESSAGES, "max_tokens": 4})
    body = json.loads(client.collect(reply)[-1].payload)
    assert body["error"]["code"] == "bad_request"
    assert "chat template" in body["error"]["message"]
    reply = client.request("dev1", {"id": "plain", "prompt": "hello", "max_tokens": 4})
    assert json.loads(client.collect(reply)[-1].payload)["usage"]["completion_tokens"] == 4
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert not marker.exists()

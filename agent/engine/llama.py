"""Load a GGUF file with llama-cpp-python and generate from it, one request at a time.

We drive ``Llama.generate`` token by token instead of ``create_completion`` so that we count tokens
exactly, check cancellation after every token, and stream without extra copies. Chat prompts are
rendered with the model's own GGUF chat template; a model without one only takes plain prompts,
because guessing a template makes a model answer badly without saying why.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.engine.stops import StopScanner
from agent.errors import AgentError, BadRequestError, ModelFileError, ModelUnavailableError, TooLargeError
from agent.hardware.probe import physical_cores  # only agent.hardware asks the OS (psutil) about the CPU

log = structlog.get_logger("agent.engine")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tokens_per_s: float


@dataclass(frozen=True, slots=True)
class LoadedModel:
    path: Path
    name: str
    n_ctx: int
    threads: int
    has_chat_template: bool
    load_s: float


def diagnose_model_file(path: Path) -> str | None:
    """Why llama.cpp refused ``path``, when its header shows it: llama.cpp itself only says "Failed to load
    model from file", and the operator's next question is whether the file is damaged (re-pull it) or the
    model is unsupported (pick another). None when the header and the file's size look sound."""
    from agent.catalog.gguf_header import GgufFormatError, read_local  # noqa: PLC0415

    try:
        info = read_local(path)
        size = path.stat().st_size
    except GgufFormatError as exc:
        return f"the file is damaged or not a GGUF model ({str(exc).removeprefix(f'{path}: ')})"
    except (AgentError, OSError):
        return None
    end = info.data_offset + max((t.offset + t.n_bytes for t in info.tensors), default=0)
    if size < end:
        return f"the file is damaged or truncated: {size} bytes, its tensors end at byte {end} (pull it again)"
    return None


class LlamaEngine:
    """Owns one loaded model. Not thread-safe: the inference worker is its only caller."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        threads: int = 0,
        n_batch: int = 512,
        chat_template: str | None = None,
        seed: int = -1,
    ) -> None:
        self._path = path
        self._n_ctx = n_ctx
        self._threads = threads or physical_cores()
        self._n_batch = n_batch
        self._template_override = chat_template
        self._seed = seed
        self._llm: object | None = None
        self._formatter: Callable[[list[dict[str, str]]], str] | None = None
        self._is_eog: Callable[[int], bool] = lambda _tok: False
        self.info: LoadedModel | None = None

    def load(self) -> LoadedModel:
        """Load the model (mmap); raises ModelFileError / ModelUnavailableError with the reason."""
        if not self._path.is_file():
            raise ModelFileError(f"model file not found: {self._path}")
        import llama_cpp  # noqa: PLC0415 - import cost paid only when a model is loaded
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: PLC0415

        started = time.monotonic()
        try:
            llm = llama_cpp.Llama(
                model_path=str(self._path),
                n_ctx=self._n_ctx,
                n_threads=self._threads,
                n_threads_batch=self._threads,
                n_batch=min(self._n_batch, self._n_ctx),
                seed=self._seed if self._seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            reason = diagnose_model_file(self._path)
            raise ModelUnavailableError(
                f"llama.cpp could not load {self._path}: {reason or exc}"
            ) from exc
        metadata: dict[str, str] = dict(llm.metadata)
        template = self._template_override or metadata.get("tokenizer.chat_template")
        if template:
            eos_id, bos_id = llm.token_eos(), llm.token_bos()
            formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
            )
            self._formatter = lambda messages: formatter(messages=messages).prompt  # type: ignore[arg-type]
        self._llm = llm
        self._is_eog = lambda tok: bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok))
        self.info = LoadedModel(
            path=self._path,
            name=metadata.get("general.name") or self._path.stem,
            n_ctx=llm.n_ctx(),
            threads=self._threads,
            has_chat_template=template is not None,
            load_s=time.monotonic() - started,
        )
        log.info(
            "model_loaded",
            path=str(self._path),
            model=self.info.name,
            n_ctx=self.info.n_ctx,
            threads=self._threads,
            chat_template=self.info.has_chat_template,
            load_s=round(self.info.load_s, 3),
        )
        return self.info

    def set_threads(self, threads: int) -> None:
        """Change generation threads live (between requests; llama.cpp applies it to the next decode)."""
        llm = self._llm_or_raise()
        llm._ctx.set_n_threads(threads, threads)  # type: ignore[attr-defined]
        self._threads = threads
        if self.info is not None:
            self.info = LoadedModel(
                path=self.info.path,
                name=self.info.name,
                n_ctx=self.info.n_ctx,
                threads=threads,
                has_chat_template=self.info.has_chat_template,
                load_s=self.info.load_s,
            )
        log.info("threads_changed", threads=threads)

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()  # type: ignore[attr-defined]

    # -- generation --------------------------------------------------------------------------------

    def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        if self._formatter is None:
            raise BadRequestError(
                "this model has no chat template: send a plain 'prompt' instead of 'messages' "
                "(or configure model.chat_template)"
            )
        try:
            prompt = self._formatter(list(messages))
        except Exception as exc:  # jinja2 raises many types; the template is the model's, not the caller's
            raise BadRequestError(f"the model's chat template rejected these messages: {exc}") from exc
        return self._llm_or_raise().tokenize(prompt.encode(), add_bos=False, special=True)  # type: ignore[attr-defined, no-any-return]

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return self._llm_or_raise().tokenize(prompt.encode(), add_bos=True, special=False)  # type: ignore[attr-defined, no-any-return]

    def generate(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> GenerationResult:
        """Generate up to ``params.max_tokens``; call ``on_text`` with each safe-to-emit piece."""
        llm = self._llm_or_raise()
        n_ctx = self.info.n_ctx if self.info else self._n_ctx
        if not prompt_tokens:
            raise BadRequestError("the prompt is empty")
        if len(prompt_tokens) >= n_ctx:
            raise TooLargeError(
                f"the prompt is {len(prompt_tokens)} tokens; the context holds {n_ctx} "
                "(shorten it or raise model.n_ctx)"
            )
        budget = min(params.max_tokens, n_ctx - len(prompt_tokens))
        if params.seed is not None:
            llm.set_seed(params.seed)  # type: ignore[attr-defined]
        scanner = StopScanner(params.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        detok = llm.detokenize  # type: ignore[attr-defined]
        is_eog = self._is_eog
        started = time.perf_counter()
        first_at = 0.0
        count = 0
        finish = "length"
        for token in llm.generate(  # type: ignore[attr-defined]
            prompt_tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        ):
            if count == 0:
                first_at = time.perf_counter()
            if is_eog(token):
                finish = "stop"
                break
            count += 1
            piece = decoder.decode(detok([token]))
            if piece:
                out = scanner.feed(piece)
                if out:
                    on_text(out)
                if scanner.stopped:
                    finish = "stop"
                    break
            if count >= budget:
                break
            if cancelled():
                finish = "cancelled"
                break
        _flush_text(decoder, scanner, on_text)
        ended = time.perf_counter()
        decode_s = ended - first_at if first_at else 0.0
        return GenerationResult(
            text=scanner.text,
            finish_reason=finish,
            prompt_tokens=len(prompt_tokens),
            completion_tokens=count,
            ttft_s=(first_at or ended) - started,
            decode_tokens_per_s=(count - 1) / decode_s if count > 1 and decode_s > 0 else 0.0,
        )

    def _llm_or_raise(self) -> object:
        if self._llm is None:
            raise ModelUnavailableError("no model is loaded")
        return self._llm


def _flush_text(decoder: codecs.IncrementalDecoder, scanner: StopScanner, on_text: Callable[[str], None]) -> None:
    """End of generation: emit any incomplete UTF-8 tail and text held back for stop matching."""
    tail = decoder.decode(b"", final=True)
    if scanner.stopped:
        return
    out = (scanner.feed(tail) if tail else "") + (scanner.flush() if not scanner.stopped else "")
    if out:
        on_text(out)

"""Load a GGUF file with llama.cpp and decode several requests together on it (continuous batching).

llama-cpp-python's high-level ``Llama`` serves one sequence (it never sets ``n_seq_max``), so the
engine drives llama.cpp's own API through llama-cpp-python's bindings: one context with ``parallel``
sequence slots over a *unified* KV cache (without it each sequence silently gets n_ctx/N cells and
mixed batches are split), one ``llama_batch`` per step holding the next token of every running
sequence plus a chunk of a waiting prompt (chunked prefill: a long prompt delays the others by one
chunk, not by its length), and a sampler chain per sequence (its own seed, temperature, penalties).

A finished sequence leaves its tokens in its slot's cells; the next prompt that starts the same way
(a shared system prompt) reuses them in place or copies them from another slot
(``llama_memory_seq_cp``: in a unified cache the cells are shared, not duplicated), so only the new
part is evaluated. Models with a sliding-window cache (Gemma 3) keep only the window, so there a
slot is cleared and its prompt evaluated in full.

Tokens are counted exactly, cancellation is checked every step, and text is streamed without
re-decoding: each token's bytes go through an incremental UTF-8 decoder and the stop scanner.
Chat prompts are rendered with the model's own GGUF chat template; a model without one only takes
plain prompts, because guessing a template makes a model answer badly without saying why.

Not thread-safe: the inference worker is the only caller.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from agent.engine.stops import StopScanner
from agent.errors import AgentError, BadRequestError, ModelFileError, ModelUnavailableError, TooLargeError
from agent.hardware.probe import physical_cores  # only agent.hardware asks the OS (psutil) about the CPU

log = structlog.get_logger("agent.engine")

#: Last generated tokens the repeat penalty looks at (llama-cpp-python's ``last_n_tokens_size``). Like its
#: ``Llama``, only generated tokens enter that history (the prompt does not), so outputs stay equal to it.
PENALTY_LAST_N = 64


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF the text must match (agent.engine.grammar), root rule "root"

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    cached_tokens: int = 0  # prompt tokens reused from a slot's cache (not evaluated again)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    path: Path
    name: str
    n_ctx: int  # per sequence
    threads: int
    has_chat_template: bool
    load_s: float
    parallel: int = 1
    use_mmap: bool = True
    kv_type: str = "f16"


#: What a started sequence reports when it ends: its result, or the error that ended it.
Outcome = GenerationResult | AgentError


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


def _decide_mmap(path: Path) -> bool:
    """Map the file unless most of its weights are repacked for this CPU (then mapped pages are paid twice)."""
    from agent.catalog.estimate import load_with_mmap  # noqa: PLC0415
    from agent.catalog.gguf_header import read_local  # noqa: PLC0415

    try:
        return load_with_mmap(read_local(path))
    except (AgentError, OSError, ValueError):
        return True  # llama.cpp will say what is wrong with the file


@dataclass(slots=True, eq=False)
class Generation:
    """One request's generation in a slot. The engine's own bookkeeping; callers hold it only to cancel."""

    slot: int
    prompt: list[int]
    params: SamplingParams
    on_text: Callable[[str], None]
    on_done: Callable[[Outcome], None]
    cancelled: Callable[[], bool]
    sampler: Any
    budget: int
    cached: int
    started: float
    scanner: StopScanner
    decoder: codecs.IncrementalDecoder
    fed: int = 0  # prompt tokens in the KV cache (cached ones included)
    pending: int | None = None  # sampled, not yet in the cache
    count: int = 0
    first_at: float = 0.0
    out_index: int = -1  # its logits row in the current batch
    done: bool = False


@dataclass(slots=True)
class _Slot:
    tokens: list[int] = field(default_factory=list)  # exactly what its KV cells hold
    seq: Generation | None = None
    used_at: float = 0.0


class LlamaEngine:
    """Owns one loaded model and its context of ``parallel`` slots."""

    def __init__(
        self,
        path: Path,
        *,
        n_ctx: int,
        threads: int = 0,
        n_batch: int = 512,
        chat_template: str | None = None,
        seed: int = -1,
        parallel: int = 1,
        use_mmap: bool | None = None,
        kv_type: str = "f16",
        prefill_chunk: int = 128,
    ) -> None:
        self._path = path
        self._n_ctx = n_ctx
        self._threads = threads or physical_cores()
        self._parallel = max(1, parallel)
        self._n_batch = max(min(n_batch, n_ctx * self._parallel), self._parallel + 1)
        self._template_override = chat_template
        self._seed = seed
        self._use_mmap = use_mmap
        self._kv_type = kv_type
        self.prefill_chunk = prefill_chunk
        self._model: Any = None
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self._vocab: Any = None
        self._formatter: Callable[[list[dict[str, str]]], str] | None = None
        self._eog: Callable[[int], bool] = lambda _tok: False
        self._pieces: dict[int, bytes] = {}
        self._slots: list[_Slot] = []
        self._running: list[Generation] = []  # in start order: prefill is first come, first served
        self._reuse_prefix = True
        self.info: LoadedModel | None = None

    # -- life cycle --------------------------------------------------------------------------------

    def load(self) -> LoadedModel:
        """Load the model and make the context; raises ModelFileError / ModelUnavailableError with the reason."""
        if not self._path.is_file():
            raise ModelFileError(f"model file not found: {self._path}")
        import llama_cpp  # noqa: PLC0415 - import cost paid only when a model is loaded
        from llama_cpp import _internals  # noqa: PLC0415

        started = time.monotonic()
        use_mmap = _decide_mmap(self._path) if self._use_mmap is None else self._use_mmap
        _quiet_llama_log()
        model_params = llama_cpp.llama_model_default_params()
        model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        try:
            model = _internals.LlamaModel(path_model=str(self._path), params=model_params, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            reason = diagnose_model_file(self._path)
            raise ModelUnavailableError(f"llama.cpp could not load {self._path}: {reason or exc}") from exc
        try:
            self._make_context(llama_cpp, model)
        except Exception:
            model.close()  # type: ignore[no-untyped-call]
            raise
        self._model = model
        self._vocab = model.vocab
        metadata: dict[str, str] = dict(model.metadata())
        template = self._template_override or metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: PLC0415

            eos_id, bos_id = model.token_eos(), model.token_bos()
            formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            )
            self._formatter = lambda messages: formatter(messages=messages).prompt  # type: ignore[arg-type]
        vocab = self._vocab
        is_eog = llama_cpp.llama_vocab_is_eog
        self._eog = lambda tok: bool(is_eog(vocab, tok))
        # A sliding-window cache keeps only the window: a prefix cannot be kept or copied reliably.
        self._reuse_prefix = llama_cpp.llama_model_n_swa(model.model) == 0
        self._slots = [_Slot() for _ in range(self._parallel)]
        self.info = LoadedModel(
            path=self._path,
            name=metadata.get("general.name") or self._path.stem,
            n_ctx=self._n_ctx,
            threads=self._threads,
            has_chat_template=template is not None,
            load_s=time.monotonic() - started,
            parallel=self._parallel,
            use_mmap=use_mmap,
            kv_type=self._kv_type,
        )
        log.info(
            "model_loaded",
            path=str(self._path),
            model=self.info.name,
            n_ctx=self._n_ctx,
            parallel=self._parallel,
            threads=self._threads,
            use_mmap=use_mmap,
            kv_type=self._kv_type,
            prefix_reuse=self._reuse_prefix,
            chat_template=self.info.has_chat_template,
            load_s=round(self.info.load_s, 3),
        )
        return self.info

    def _make_context(self, llama_cpp: Any, model: Any) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self._n_ctx * self._parallel
        params.n_batch = self._n_batch
        params.n_ubatch = self._n_batch
        params.n_seq_max = self._parallel
        params.kv_unified = True
        params.swa_full = False
        params.n_threads = params.n_threads_batch = self._threads
        params.no_perf = True
        if self._kv_type != "f16":
            kv = getattr(llama_cpp, f"GGML_TYPE_{self._kv_type.upper()}")
            params.type_k = params.type_v = kv
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V cache needs it
        else:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not ctx:
            raise ModelUnavailableError(
                f"llama.cpp could not make a context of {self._parallel} x {self._n_ctx} tokens for {self._path} "
                "(out of memory? lower model.n_ctx or inference.parallel)"
            )
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)

    def set_threads(self, threads: int) -> None:
        """Change generation threads live (llama.cpp applies it to the next decode)."""
        import llama_cpp  # noqa: PLC0415

        llama_cpp.llama_set_n_threads(self._ctx_or_raise(), threads, threads)
        self._threads = threads
        if self.info is not None:
            self.info = replace(self.info, threads=threads)
        log.info("threads_changed", threads=threads)

    def close(self) -> None:
        """Free the context and the model; sequences still running end 'cancelled'."""
        import llama_cpp  # noqa: PLC0415

        for seq in list(self._running):
            self._end(seq, "cancelled")
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = self._mem = None
        model, self._model = self._model, None
        if model is not None:
            model.close()

    # -- prompts -----------------------------------------------------------------------------------

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
        return self._model_or_raise().tokenize(prompt.encode(), add_bos=False, special=True)  # type: ignore[no-any-return]

    def tokenize_prompt(self, prompt: str) -> list[int]:
        return self._model_or_raise().tokenize(prompt.encode(), add_bos=True, special=False)  # type: ignore[no-any-return]

    # -- batching ----------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self._parallel

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def free_slots(self) -> int:
        return self._parallel - len(self._running)

    def start(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None],
        on_done: Callable[[Outcome], None],
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Generation:
        """Take a free slot for a new sequence; it advances with each :meth:`step` and ends with ``on_done``
        (called exactly once, from ``step``). Raises (nothing started) when the prompt cannot be served."""
        self._ctx_or_raise()
        n_ctx = self._n_ctx
        if not prompt_tokens:
            raise BadRequestError("the prompt is empty")
        if len(prompt_tokens) >= n_ctx:
            raise TooLargeError(
                f"the prompt is {len(prompt_tokens)} tokens; the context holds {n_ctx} "
                "(shorten it or raise model.n_ctx)"
            )
        if not self.free_slots:
            raise AgentError("no free slot (the caller starts sequences only when free_slots > 0)")
        slot, cached = self._claim_slot(prompt_tokens)
        seq = Generation(
            slot=slot,
            prompt=list(prompt_tokens),
            params=params,
            on_text=on_text,
            on_done=on_done,
            cancelled=cancelled,
            sampler=self._sampler(params),
            budget=min(params.max_tokens, n_ctx - len(prompt_tokens)),
            cached=cached,
            started=time.perf_counter(),
            scanner=StopScanner(params.stop),
            decoder=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            fed=cached,
        )
        self._slots[slot].seq = seq
        self._running.append(seq)
        if seq.budget <= 0:
            self._end(seq, "length")
        return seq

    def step(self) -> int:
        """Decode one batch: the next token of every generating sequence plus a chunk of waiting prompts.

        Returns how many tokens the batch held (0 = nothing to do). Sequences that end call ``on_done``.
        """
        import llama_cpp  # noqa: PLC0415

        for seq in [s for s in self._running if s.cancelled()]:
            self._end(seq, "cancelled")
        if not self._running:
            return 0
        batch = self._batch
        tokens, pos, n_seq, seq_ids, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        n = 0
        decoding = False
        for seq in self._running:
            if seq.pending is not None:
                held = self._slots[seq.slot].tokens
                tokens[n], pos[n], n_seq[n], logits[n] = seq.pending, len(held), 1, True
                seq_ids[n][0] = seq.slot
                held.append(seq.pending)
                seq.pending = None
                seq.out_index = n
                n += 1
                decoding = True
        # Prompts: one chunk beside running sequences; the whole batch when nobody is waiting for a token.
        n = self._add_prompt_chunks(n, min(self._n_batch - n, self.prefill_chunk if decoding else self._n_batch))
        if n == 0:
            return 0
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            self._decode_failed(rc)
            return n
        sample = llama_cpp.llama_sampler_sample
        for seq in list(self._running):
            if seq.out_index < 0:
                continue
            token = sample(seq.sampler, self._ctx, seq.out_index)
            seq.out_index = -1
            self._advance(seq, token)
        return n

    def _add_prompt_chunks(self, n: int, room: int) -> int:
        """Add waiting prompt tokens to the batch after its first ``n`` entries, first come first served."""
        batch = self._batch
        tokens, pos, n_seq, seq_ids, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        for seq in self._running:
            if room <= 0:
                break
            left = len(seq.prompt) - seq.fed
            if left <= 0 or seq.out_index >= 0:
                continue
            take = min(left, room)
            held = self._slots[seq.slot].tokens
            for tok in seq.prompt[seq.fed : seq.fed + take]:
                tokens[n], pos[n], n_seq[n], logits[n] = tok, len(held), 1, False
                seq_ids[n][0] = seq.slot
                held.append(tok)
                n += 1
            seq.fed += take
            room -= take
            if seq.fed == len(seq.prompt):
                logits[n - 1] = True  # the first generated token is sampled from here
                seq.out_index = n - 1
        return n

    def _advance(self, seq: Generation, token: int) -> None:
        if seq.count == 0:
            seq.first_at = time.perf_counter()
        if self._eog(token):
            self._end(seq, "stop")
            return
        seq.count += 1
        piece = seq.decoder.decode(self._piece(token))
        if piece:
            out = seq.scanner.feed(piece)
            if out:
                seq.on_text(out)
            if seq.scanner.stopped:
                self._end(seq, "stop")
                return
        if seq.count >= seq.budget:
            self._end(seq, "length")
            return
        seq.pending = token

    def _end(self, seq: Generation, finish: str) -> None:
        """Free the slot (its cells stay for prefix reuse, where the model allows it) and report the result."""
        if seq.done:
            return
        seq.done = True
        self._running.remove(seq)
        slot = self._slots[seq.slot]
        slot.seq, slot.used_at = None, time.monotonic()
        if not self._reuse_prefix:
            self._forget_slot(seq.slot)
        _free_sampler(seq.sampler)
        _flush_text(seq.decoder, seq.scanner, seq.on_text)
        ended = time.perf_counter()
        decode_s = ended - seq.first_at if seq.first_at else 0.0
        result = GenerationResult(
            text=seq.scanner.text,
            finish_reason=finish,
            prompt_tokens=len(seq.prompt),
            completion_tokens=seq.count,
            ttft_s=(seq.first_at or ended) - seq.started,
            decode_tokens_per_s=(seq.count - 1) / decode_s if seq.count > 1 and decode_s > 0 else 0.0,
            cached_tokens=seq.cached,
        )
        self._report(seq, result)

    def _fail(self, seq: Generation, error: AgentError) -> None:
        if seq.done:
            return
        seq.done = True
        self._running.remove(seq)
        self._forget_slot(seq.slot)
        self._slots[seq.slot].seq = None
        _free_sampler(seq.sampler)
        self._report(seq, error)

    @staticmethod
    def _report(seq: Generation, outcome: Outcome) -> None:
        try:
            seq.on_done(outcome)
        except Exception:  # a caller's callback must not leave the batch half-updated
            log.exception("sequence_callback_failed", slot=seq.slot)

    def _decode_failed(self, rc: int) -> None:
        """llama_decode refused the batch: every sequence in it ends with the error, their cells are dropped."""
        log.error("decode_failed", rc=rc, running=len(self._running))
        error = AgentError(f"llama_decode failed (code {rc})")
        for seq in list(self._running):
            self._fail(seq, error)

    def generate(
        self,
        prompt_tokens: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> GenerationResult:
        """One sequence from start to end (the CLI and tests; the inference worker batches with start/step)."""
        outcome: list[Outcome] = []
        self.start(prompt_tokens, params, on_text, outcome.append, cancelled)
        while not outcome:
            if self.step() == 0 and not outcome:
                raise AgentError("the engine stopped without finishing the sequence")
        if isinstance(outcome[0], AgentError):
            raise outcome[0]
        return outcome[0]

    # -- slots and prefix reuse --------------------------------------------------------------------

    def _claim_slot(self, prompt: list[int]) -> tuple[int, int]:
        """Pick a free slot for ``prompt`` and keep the longest cached prefix it can; (slot, cached tokens).

        The other idle slots' cells are freed: in a unified cache every token attends over the span of
        occupied cells (other sequences' are only masked), so cells kept for a reuse that did not come
        slowed one client's decoding by a third (SmolLM2, 4 slots, measured by python -m bench)."""
        free = [i for i, s in enumerate(self._slots) if s.seq is None]
        slot, cached = self._reuse_or_clear(free, prompt)
        for other in free:
            if other != slot and self._slots[other].tokens:
                self._forget_slot(other)  # a donor's shared cells stay: they belong to ``slot`` too now
        return slot, cached

    def _reuse_or_clear(self, free: list[int], prompt: list[int]) -> tuple[int, int]:
        import llama_cpp  # noqa: PLC0415

        if not self._reuse_prefix:
            return free[0], 0  # without reuse, every way a sequence ends (_end, _fail) already freed its cells
        # At least one prompt token is evaluated, for the logits of the first generated token.
        limit = len(prompt) - 1

        def shared(i: int) -> int:
            return min(_common_prefix(self._slots[i].tokens, prompt), limit)

        own = max(free, key=lambda i: (shared(i), -self._slots[i].used_at))
        best_own = shared(own)
        if best_own == 0:
            own = min(free, key=lambda i: (len(self._slots[i].tokens), self._slots[i].used_at))
        donor = max(range(len(self._slots)), key=shared)
        best = shared(donor)
        mem = self._mem
        if best > best_own and donor != own:
            llama_cpp.llama_memory_seq_rm(mem, own, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, donor, own, 0, best)
            self._slots[own].tokens = prompt[:best]
            return own, best
        if not llama_cpp.llama_memory_seq_rm(mem, own, best_own, -1):
            self._forget_slot(own)
            return own, 0
        del self._slots[own].tokens[best_own:]
        return own, best_own

    def _forget_slot(self, slot: int) -> None:
        import llama_cpp  # noqa: PLC0415

        if self._mem is not None:
            llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self._slots[slot].tokens = []

    def _sampler(self, params: SamplingParams) -> Any:
        """The sequence's own sampler chain, in llama-cpp-python's order (penalties, top-k, top-p, min-p, temp)."""
        import llama_cpp  # noqa: PLC0415

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if params.grammar is not None:
            # First, so every later step only sees tokens the grammar allows (the reply always parses).
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, params.grammar.encode(), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise BadRequestError("the response format's grammar could not be compiled")
            add(chain, grammar)
        if params.penalized:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                0, PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty))
        if params.temperature <= 0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else self._seed
            add(chain, llama_cpp.llama_sampler_init_dist(seed if seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED))
        return chain

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            import llama_cpp  # noqa: PLC0415

            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:  # longer than the buffer: -n is the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = buf.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece

    def _ctx_or_raise(self) -> Any:
        if self._ctx is None:
            raise ModelUnavailableError("no model is loaded")
        return self._ctx

    def _model_or_raise(self) -> Any:
        if self._model is None:
            raise ModelUnavailableError("no model is loaded")
        return self._model


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _free_sampler(sampler: Any) -> None:
    import llama_cpp  # noqa: PLC0415

    if sampler:
        llama_cpp.llama_sampler_free(sampler)


def _quiet_llama_log() -> None:
    """llama.cpp logs every tensor and buffer to stderr at load; only its errors reach the journal."""
    from llama_cpp._logger import set_verbose  # noqa: PLC0415

    set_verbose(False)


def _flush_text(decoder: codecs.IncrementalDecoder, scanner: StopScanner, on_text: Callable[[str], None]) -> None:
    """End of generation: emit any incomplete UTF-8 tail and text held back for stop matching."""
    tail = decoder.decode(b"", final=True)
    if scanner.stopped:
        return
    out = (scanner.feed(tail) if tail else "") + (scanner.flush() if not scanner.stopped else "")
    if out:
        on_text(out)


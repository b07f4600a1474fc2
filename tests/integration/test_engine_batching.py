"""The batching engine (agent/engine/llama.py) on real tiny GGUF files through llama-cpp-python.

llama.cpp is not batch-invariant: a sequence decoded beside others may differ in the last bits from the
same sequence decoded alone. Texts are therefore compared only between runs with the same batch
composition (a sequence alone against raw ``llama_cpp.Llama`` or a fresh engine, also when part of its prompt
came from a slot's cache; twins started in the same step); everything else is pinned by exact token counts,
finish reasons, slots and what each step holds. These tiny models happen to give equal texts across
compositions too (checked by hand), but a test relying on that would pin llama.cpp, not the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import pytest

from agent.engine.llama import Generation, GenerationResult, LlamaEngine, Outcome, SamplingParams
from agent.errors import BadRequestError, TooLargeError
from tests.support.tiny_gguf import write_tiny_gemma3, write_tiny_llama

pytestmark = [pytest.mark.integration]

N_CTX = 256
THREADS = 1  # the tiny models gain nothing from a second thread, and spinning threads suffer on a busy machine
WINDOW = 16  # the gemma3 model's sliding window, shorter than the prompts below
PREFIX = "You are a terse assistant on a small device. Answer in one short line, and never apologise. "
PROMPTS = (
    "The quick brown fox jumps over the lazy dog",
    "Sensor three reads forty degrees",
    "hello world",
    "Once upon a time in a quiet town",
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama files in two quant shapes (and one with 32-wide heads) and a tiny Gemma 3 with a sliding window."""
    directory = tmp_path_factory.mktemp("batching-models")
    return {
        "Q4_0": write_tiny_llama(directory / "llama-q4_0.gguf", tensor_type="Q4_0"),
        "Q8_0": write_tiny_llama(directory / "llama-q8_0.gguf", tensor_type="Q8_0"),
        # A q8_0 KV cache needs head sizes that are whole q8_0 blocks (32); the default tiny heads are 16.
        "heads32": write_tiny_llama(directory / "llama-heads32.gguf", tensor_type="Q8_0", n_embd=128, n_head=4),
        "gemma3": write_tiny_gemma3(directory / "gemma3-q8_0.gguf", tensor_type="Q8_0", sliding_window=WINDOW),
        "gemma3_heads32": write_tiny_gemma3(
            directory / "gemma3-heads32.gguf", tensor_type="Q8_0", sliding_window=WINDOW, n_embd=128
        ),
    }


@pytest.fixture
def engines() -> Iterator[Callable[..., LlamaEngine]]:
    """Factory: a loaded engine on a model file; every engine is closed at teardown."""
    made: list[LlamaEngine] = []

    def _make(path: Path, **kwargs: object) -> LlamaEngine:
        engine = LlamaEngine(path, n_ctx=kwargs.pop("n_ctx", N_CTX), threads=THREADS, **kwargs)  # type: ignore[arg-type]
        engine.load()
        made.append(engine)
        return engine

    yield _make
    for engine in made:
        engine.close()


@dataclass
class Seq:
    """One request's callbacks: streamed chunks, its outcome, and a cancel switch."""

    chunks: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    cancel: bool = False
    gen: Generation | None = None

    def start(self, engine: LlamaEngine, prompt: list[int], params: SamplingParams) -> Seq:
        self.gen = engine.start(prompt, params, self.chunks.append, self.outcomes.append, lambda: self.cancel)
        return self

    @property
    def done(self) -> bool:
        return bool(self.outcomes)

    @property
    def result(self) -> GenerationResult:
        assert len(self.outcomes) == 1, self.outcomes
        outcome = self.outcomes[0]
        assert isinstance(outcome, GenerationResult), outcome
        return outcome

    @property
    def slot(self) -> int:
        assert self.gen is not None
        return self.gen.slot


def greedy(max_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop)


def drain(engine: LlamaEngine, limit: int = 5000) -> int:
    """Step until no sequence runs; returns the number of steps."""
    steps = 0
    while engine.active:
        assert engine.step() > 0, "a step with running sequences decoded nothing"
        steps += 1
        assert steps < limit
    return steps


@functools.cache  # a pure function of the file and arguments; tests for 1 and 4 slots share the reference
def raw_greedy(path: Path, prompt: str, max_tokens: int, *, kv8: bool = False, repeat_penalty: float = 1.0) -> str:
    """What llama-cpp-python's high-level Llama generates greedily (``kv8``: with a q8_0 KV cache)."""
    context = (
        {"type_k": llama_cpp.GGML_TYPE_Q8_0, "type_v": llama_cpp.GGML_TYPE_Q8_0, "flash_attn": True} if kv8 else {}
    )
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, verbose=False, **context)
    try:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=repeat_penalty)
        return out["choices"][0]["text"]  # type: ignore[index]
    finally:
        llm.close()


def alone(engine: LlamaEngine, prompt: str, max_tokens: int) -> GenerationResult:
    """One sequence from start to end on ``engine`` with greedy sampling."""
    return engine.generate(engine.tokenize_prompt(prompt), greedy(max_tokens), lambda _s: None, lambda: False)


class TestSingleSequence:
    """One sequence at a time behaves like llama-cpp-python's own Llama."""

    @pytest.mark.parametrize("quant", ["Q4_0", "Q8_0"])
    @pytest.mark.parametrize("parallel", [1, 4])
    def test_greedy_output_equals_raw_llama(self, models, engines, quant: str, parallel: int) -> None:
        """A single greedy sequence gives exactly the text and token count raw Llama gives on the same n_ctx."""
        engine = engines(models[quant], parallel=parallel)
        for prompt in PROMPTS[:2]:
            result = alone(engine, prompt, 40)
            assert result.completion_tokens == 40
            assert result.finish_reason == "length"
            assert result.text == raw_greedy(models[quant], prompt, 40)

    def test_repeat_penalty_equals_raw_llama(self, models, engines) -> None:
        """With a repeat penalty, greedy output still equals raw Llama's: only generated tokens are penalised."""
        path = models["Q8_0"]
        engine = engines(path, parallel=2)
        params = SamplingParams(max_tokens=40, temperature=0.0, repeat_penalty=1.3)
        for prompt in PROMPTS[:3]:
            result = engine.generate(engine.tokenize_prompt(prompt), params, lambda _s: None, lambda: False)
            assert result.text == raw_greedy(path, prompt, 40, repeat_penalty=1.3)

    def test_seeded_sampling_equals_raw_llama(self, models, engines) -> None:
        """Temperature sampling with a seed gives raw Llama's text for that seed (same chain, same order)."""
        path = models["Q8_0"]
        engine = engines(path, parallel=2)
        llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, verbose=False)
        try:
            for seed in (1, 2):
                params = SamplingParams(max_tokens=30, temperature=0.8, top_k=40, top_p=0.95, min_p=0.0, seed=seed)
                ours = engine.generate(engine.tokenize_prompt(PROMPTS[0]), params, lambda _s: None, lambda: False)
                raw = llm.create_completion(
                    PROMPTS[0], max_tokens=30, temperature=0.8, top_k=40, top_p=0.95, min_p=0.0, seed=seed
                )
                assert ours.text == raw["choices"][0]["text"]  # type: ignore[index]
        finally:
            llm.close()

    def test_chat_prompt_equals_raw_llama_chat_completion(self, models, engines) -> None:
        """Messages rendered with the model's own template give raw Llama's greedy chat reply."""
        path = models["Q8_0"]
        engine = engines(path, parallel=2)
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there, how are you?"},
        ]
        ours = engine.generate(engine.tokenize_chat(messages), greedy(30), lambda _s: None, lambda: False)
        llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, verbose=False)
        try:
            raw = llm.create_chat_completion(messages, max_tokens=30, temperature=0.0)  # type: ignore[arg-type]
        finally:
            llm.close()
        assert ours.text == raw["choices"][0]["message"]["content"]  # type: ignore[index]
        assert ours.prompt_tokens == raw["usage"]["prompt_tokens"]  # type: ignore[index]

    def test_empty_prompt_is_a_bad_request(self, models, engines) -> None:
        """An empty prompt raises BadRequestError and leaves every slot free."""
        engine = engines(models["Q8_0"], parallel=2)
        with pytest.raises(BadRequestError):
            Seq().start(engine, [], greedy(4))
        assert engine.free_slots == 2
        assert engine.active == 0

    def test_prompt_larger_than_a_sequence_context_is_too_large(self, models, engines) -> None:
        """A prompt of n_ctx tokens raises TooLargeError without taking a slot, though the context holds 2 x n_ctx."""
        engine = engines(models["Q8_0"], parallel=2, n_ctx=64)
        busy = Seq().start(engine, engine.tokenize_prompt(PROMPTS[0]), greedy(8))
        prompt = (engine.tokenize_prompt(PREFIX * 4))[:64]
        with pytest.raises(TooLargeError):
            Seq().start(engine, prompt, greedy(4))
        assert engine.free_slots == 1
        # One token shorter fits, with room for exactly one generated token.
        last = Seq().start(engine, prompt[:63], greedy(4))
        drain(engine)
        assert busy.result.completion_tokens == 8
        assert last.result.completion_tokens == 1
        assert last.result.finish_reason == "length"


class TestBatch:
    """Several sequences in one batch, each with its own budget, stops and stream."""

    def test_sequences_started_together_end_with_their_own_token_counts(self, models, engines) -> None:
        """Four sequences with different max_tokens each end with exactly that many tokens, one chunk per token."""
        engine = engines(models["Q4_0"], parallel=4)
        budgets = (3, 9, 17, 30)
        seqs = [
            Seq().start(engine, engine.tokenize_prompt(p), greedy(n)) for p, n in zip(PROMPTS, budgets, strict=True)
        ]
        assert engine.free_slots == 0
        assert sorted(s.slot for s in seqs) == [0, 1, 2, 3]
        drain(engine)
        for seq, budget in zip(seqs, budgets, strict=True):
            assert seq.result.completion_tokens == budget
            assert seq.result.finish_reason == "length"
            assert seq.result.prompt_tokens == len(engine.tokenize_prompt(PROMPTS[seqs.index(seq)]))
            assert len(seq.chunks) == budget  # the tiny models' tokens are plain ASCII: one chunk each
            assert "".join(seq.chunks) == seq.result.text
            assert seq.result.ttft_s > 0
            assert seq.result.decode_tokens_per_s > 0
        assert engine.free_slots == 4

    def test_every_slot_fills_its_whole_context_at_once(self, models, engines) -> None:
        """Four sequences run to their full per-sequence n_ctx at the same time, and again in the same slots."""
        engine = engines(models["Q8_0"], parallel=4, n_ctx=64)
        for round_ in range(2):
            prompts = [engine.tokenize_prompt(f"{round_} {p} {PREFIX}")[: 30 + 4 * i] for i, p in enumerate(PROMPTS)]
            seqs = [Seq().start(engine, prompt, greedy(200)) for prompt in prompts]
            drain(engine)
            for seq, prompt in zip(seqs, prompts, strict=True):
                assert seq.result.finish_reason == "length"
                assert seq.result.completion_tokens == 64 - len(prompt)

    def test_stop_strings_apply_to_their_own_sequence(self, models, engines) -> None:
        """Twins in one batch: the one with a stop string ends before it; the one without runs to max_tokens."""
        engine = engines(models["Q4_0"], parallel=4)
        reference = alone(engine, PROMPTS[0], 30).text
        stop = reference[10:13]  # most likely spans a token boundary
        other_stop = "\x00never"
        prompt = engine.tokenize_prompt(PROMPTS[0])
        stopped = Seq().start(engine, prompt, greedy(30, (stop,)))
        full = Seq().start(engine, prompt, greedy(30, (other_stop,)))
        plain = Seq().start(engine, engine.tokenize_prompt(PROMPTS[1]), greedy(20))
        drain(engine)
        assert stop in full.result.text
        assert stopped.result.finish_reason == "stop"
        assert stopped.result.text == full.result.text[: full.result.text.index(stop)]
        assert stop not in "".join(stopped.chunks)
        assert full.result.finish_reason == "length"
        assert full.result.completion_tokens == 30
        assert plain.result.completion_tokens == 20
        for seq in (stopped, full, plain):
            assert "".join(seq.chunks) == seq.result.text

    def test_identical_sequences_in_one_step_give_identical_text(self, models, engines) -> None:
        """Three sequences with the same prompt started in the same step generate the same greedy text."""
        engine = engines(models["Q8_0"], parallel=3)
        prompt = engine.tokenize_prompt(PROMPTS[3])
        seqs = [Seq().start(engine, prompt, greedy(32)) for _ in range(3)]
        drain(engine)
        texts = {s.result.text for s in seqs}
        assert len(texts) == 1
        assert all(s.result.completion_tokens == 32 for s in seqs)

    def test_text_held_back_for_a_stop_string_is_streamed_at_the_end(self, models, engines) -> None:
        """A reply ending in the start of a stop string that never completes still streams all of its text."""
        engine = engines(models["Q8_0"], parallel=2)
        reference = alone(engine, PROMPTS[1], 25)
        never = reference.text[-2:] + "\x01"
        seq = Seq().start(engine, engine.tokenize_prompt(PROMPTS[1]), greedy(25, (never,)))
        drain(engine)
        assert seq.result.finish_reason == "length"
        assert seq.result.text == reference.text
        assert "".join(seq.chunks) == reference.text
        assert len(seq.chunks) < 25  # the last tokens were held back, then flushed together

    def test_close_ends_running_sequences_as_cancelled(self, models, engines) -> None:
        """Closing the engine reports every running sequence once, 'cancelled', with what it had produced."""
        engine = engines(models["Q8_0"], parallel=2)
        seqs = [Seq().start(engine, engine.tokenize_prompt(p), greedy(50)) for p in PROMPTS[:2]]
        for _ in range(4):
            engine.step()
        engine.close()
        for seq in seqs:
            assert seq.result.finish_reason == "cancelled"
            assert seq.result.completion_tokens == len(seq.chunks) == 4
        assert engine.active == 0


class TestSlots:
    """A sequence that ends gives its slot back in the same step; the others do not notice."""

    def test_finished_sequence_frees_its_slot_for_the_next_request(self, models, engines) -> None:
        """A sequence that ends frees its slot in that step; a new one takes it while the long one keeps running."""
        engine = engines(models["Q8_0"], parallel=2)
        short = Seq().start(engine, engine.tokenize_prompt(PROMPTS[0]), greedy(3))
        long = Seq().start(engine, engine.tokenize_prompt(PROMPTS[1]), greedy(40))
        while not short.done:
            engine.step()
        assert engine.free_slots == 1
        assert engine.active == 1
        tokens_then = len(long.chunks)
        after = Seq().start(engine, engine.tokenize_prompt(PROMPTS[2]), greedy(10))
        assert after.slot == short.slot
        engine.step()
        assert len(long.chunks) == tokens_then + 1  # the new prompt did not stall it
        drain(engine)
        assert short.result.completion_tokens == 3
        assert long.result.completion_tokens == 40
        assert after.result.completion_tokens == 10

    def test_cancelled_sequence_frees_its_slot_for_the_next_request(self, models, engines) -> None:
        """Cancelling through the callable ends the sequence 'cancelled' in the next step; its slot serves at once."""
        engine = engines(models["Q8_0"], parallel=2)
        victim = Seq().start(engine, engine.tokenize_prompt(PROMPTS[0]), greedy(100))
        other = Seq().start(engine, engine.tokenize_prompt(PROMPTS[1]), greedy(30))
        for _ in range(5):
            engine.step()
        victim.cancel = True
        produced = len(victim.chunks)
        other_before = len(other.chunks)
        engine.step()
        assert victim.result.finish_reason == "cancelled"
        assert victim.result.completion_tokens == produced
        assert "".join(victim.chunks) == victim.result.text
        assert len(other.chunks) == other_before + 1
        assert engine.free_slots == 1
        new = Seq().start(engine, engine.tokenize_prompt(PROMPTS[2]), greedy(12))
        assert new.slot == victim.slot
        drain(engine)
        assert other.result.completion_tokens == 30
        assert other.result.finish_reason == "length"
        assert new.result.completion_tokens == 12

    def test_chunked_prefill_does_not_stall_a_running_sequence(self, models, engines) -> None:
        """While a long prompt is evaluated in small chunks, the running sequence gets one token in every step."""
        engine = engines(models["Q8_0"], parallel=2, prefill_chunk=8)
        running = Seq().start(engine, engine.tokenize_prompt(PROMPTS[0]), greedy(60))
        engine.step()  # its whole prompt (nobody else waits), and its first token
        assert len(running.chunks) == 1
        long_prompt = engine.tokenize_prompt(PREFIX * 2)
        assert len(long_prompt) > 8 * 8
        waiting = Seq().start(engine, long_prompt, greedy(5))
        steps = 0
        while not waiting.chunks:
            before = len(running.chunks)
            n = engine.step()
            steps += 1
            assert len(running.chunks) == before + 1
            assert n <= 1 + 8  # the running sequence's token plus one chunk
        assert steps == -(-len(long_prompt) // 8)
        drain(engine)
        assert running.result.completion_tokens == 60
        assert waiting.result.completion_tokens == 5

    def test_cancel_mid_prefill_leaves_the_others_intact(self, models, engines) -> None:
        """With four slots, a prompt cancelled half-evaluated ends alone; the others finish exactly, and its
        half-filled slot serves the same prompt again like a fresh engine."""
        path = models["Q8_0"]
        engine = engines(path, parallel=4, prefill_chunk=8)
        others = [Seq().start(engine, engine.tokenize_prompt(p), greedy(40)) for p in PROMPTS[:3]]
        engine.step()
        long_text = PREFIX * 2
        long_prompt = engine.tokenize_prompt(long_text)
        victim = Seq().start(engine, long_prompt, greedy(20))
        for _ in range(3):
            engine.step()
        assert not victim.chunks
        victim.cancel = True
        produced = [len(s.chunks) for s in others]
        assert engine.step() == 3  # only the others' next tokens
        assert victim.result.finish_reason == "cancelled"
        assert victim.result.completion_tokens == 0
        assert [len(s.chunks) for s in others] == [n + 1 for n in produced]
        drain(engine)
        for seq in others:
            assert seq.result.completion_tokens == 40
            assert seq.result.finish_reason == "length"
            assert "".join(seq.chunks) == seq.result.text
        again = alone(engine, long_text, 20)
        assert victim.gen is not None
        # What it had when it started (another slot's BOS) plus the chunks evaluated before the cancel.
        assert again.cached_tokens == victim.gen.cached + 3 * 8
        assert again.text == alone(engines(path), long_text, 20).text

    def test_waiting_prompts_are_evaluated_first_come_first_served(self, models, engines) -> None:
        """Two long prompts waiting beside a running sequence: the one started first gets its first token first."""
        engine = engines(models["Q8_0"], parallel=3, prefill_chunk=8)
        running = Seq().start(engine, engine.tokenize_prompt(PROMPTS[0]), greedy(80))
        engine.step()
        first = Seq().start(engine, engine.tokenize_prompt(PREFIX + "first"), greedy(5))
        second = Seq().start(engine, engine.tokenize_prompt(PREFIX + "and second"), greedy(5))
        while not first.chunks:
            assert not second.chunks
            engine.step()
        drain(engine)
        assert [s.result.completion_tokens for s in (running, first, second)] == [80, 5, 5]

    def test_thread_change_mid_batch_keeps_every_sequence_running(self, models, engines) -> None:
        """set_threads between steps applies to the next decode; running sequences finish with exact counts."""
        engine = engines(models["Q8_0"], parallel=2)
        seqs = [Seq().start(engine, engine.tokenize_prompt(p), greedy(20)) for p in PROMPTS[:2]]
        for _ in range(5):
            engine.step()
        engine.set_threads(2)
        assert engine.info is not None and engine.info.threads == 2
        drain(engine)
        assert [s.result.completion_tokens for s in seqs] == [20, 20]


class TestPrefixReuse:
    """A prompt that starts like an earlier one evaluates only the new part."""

    def test_shared_prefix_is_reused_in_the_same_slot(self, models, engines) -> None:
        """A second request sharing a long prefix reuses its slot's cells and gives a fresh engine's text."""
        path = models["Q8_0"]
        engine = engines(path, parallel=1)
        first = alone(engine, PREFIX + "What is the time?", 10)
        assert first.cached_tokens == 0
        second_text = PREFIX + "Is the door locked?"
        first_tokens = engine.tokenize_prompt(PREFIX + "What is the time?")
        second_tokens = engine.tokenize_prompt(second_text)
        shared = _common_prefix(first_tokens, second_tokens)
        assert shared > 40
        second = alone(engine, second_text, 20)
        assert second.cached_tokens == shared
        assert second.prompt_tokens == len(second_tokens)
        assert second.text == alone(engines(path), second_text, 20).text

    def test_same_prompt_again_evaluates_only_its_last_token(self, models, engines) -> None:
        """The same prompt twice reuses all but its last token (whose logits give the first reply token)."""
        engine = engines(models["Q8_0"], parallel=2)
        first = alone(engine, PREFIX + PROMPTS[0], 20)
        second = alone(engine, PREFIX + PROMPTS[0], 20)
        assert second.cached_tokens == second.prompt_tokens - 1
        assert second.text == first.text

    def test_shared_prefix_is_copied_from_a_busy_slot(self, models, engines) -> None:
        """When the slot holding a prefix is busy, a new request in another slot copies its cells and gives a
        fresh engine's text, also after the donor slot is cleared for an unrelated prompt."""
        path = models["Q8_0"]
        engine = engines(path, parallel=2)
        warm = Seq().start(engine, engine.tokenize_prompt(PREFIX + "What is the time?"), greedy(4))
        drain(engine)
        holder = Seq().start(engine, engine.tokenize_prompt(PREFIX + "Is it raining?"), greedy(50))
        assert holder.slot == warm.slot
        holder_cached = holder.gen.cached if holder.gen else 0
        assert holder_cached > 40
        text = PREFIX + "Is the door locked?"
        copier = Seq().start(engine, engine.tokenize_prompt(text), greedy(20))
        assert copier.slot != holder.slot
        holder.cancel = True  # copier then runs alone, as on the fresh engine
        engine.step()
        # The donor's slot serving an unrelated prompt drops its own cells, not the copied ones.
        unrelated = Seq(cancel=True).start(engine, engine.tokenize_prompt("zzzz qqqq"), greedy(10))
        assert unrelated.slot == holder.slot
        drain(engine)
        assert unrelated.result.finish_reason == "cancelled"
        assert holder.result.finish_reason == "cancelled"
        assert copier.result.cached_tokens == holder_cached
        assert copier.result.completion_tokens == 20
        assert copier.result.text == alone(engines(path), text, 20).text


class TestSlidingWindow:
    """Gemma 3's sliding-window cache: several sequences at once, no prefix reuse."""

    def test_single_sequence_equals_raw_llama(self, models, engines) -> None:
        """One greedy sequence longer than the window gives raw Llama's text."""
        engine = engines(models["gemma3"], parallel=3)
        prompt = PROMPTS[0]
        assert len(engine.tokenize_prompt(prompt)) > WINDOW
        result = alone(engine, prompt, 40)
        assert result.completion_tokens == 40
        assert result.text == raw_greedy(models["gemma3"], prompt, 40)

    def test_serves_several_sequences_at_once(self, models, engines) -> None:
        """Three sequences with prompts and replies past the window all end with their exact token counts."""
        engine = engines(models["gemma3"], parallel=3, prefill_chunk=8)
        budgets = (25, 40, 60)
        seqs = [
            Seq().start(engine, engine.tokenize_prompt(PREFIX + p), greedy(n))
            for p, n in zip(PROMPTS[:3], budgets, strict=True)
        ]
        drain(engine)
        for seq, budget in zip(seqs, budgets, strict=True):
            assert seq.result.completion_tokens == budget
            assert seq.result.finish_reason == "length"
            assert "".join(seq.chunks) == seq.result.text

    def test_same_prompt_twice_is_evaluated_in_full(self, models, engines) -> None:
        """The same prompt twice reuses nothing (cached_tokens == 0) and gives the same greedy text."""
        engine = engines(models["gemma3"], parallel=2)
        first = alone(engine, PREFIX + PROMPTS[0], 30)
        second = alone(engine, PREFIX + PROMPTS[0], 30)
        assert first.cached_tokens == second.cached_tokens == 0
        assert second.text == first.text


class TestKvCacheType:
    def test_q8_0_kv_cache_with_a_sliding_window(self, models, engines) -> None:
        """Gemma 3 with a q8_0 KV cache serves three sequences at once and matches raw Llama for one alone."""
        path = models["gemma3_heads32"]
        engine = engines(path, parallel=3, kv_type="q8_0", prefill_chunk=8)
        seqs = [Seq().start(engine, engine.tokenize_prompt(PREFIX + p), greedy(40)) for p in PROMPTS[:3]]
        drain(engine)
        assert [s.result.completion_tokens for s in seqs] == [40, 40, 40]
        assert alone(engine, PROMPTS[1], 40).text == raw_greedy(path, PROMPTS[1], 40, kv8=True)

    def test_q8_0_kv_cache_loads_and_generates(self, models, engines) -> None:
        """kv_type='q8_0' (flash attention) loads, serves two sequences, and matches raw Llama for one alone."""
        path = models["heads32"]
        engine = engines(path, parallel=2, kv_type="q8_0")
        assert engine.info is not None and engine.info.kv_type == "q8_0"
        seqs = [Seq().start(engine, engine.tokenize_prompt(PROMPTS[i]), greedy(n)) for i, n in enumerate((20, 35))]
        drain(engine)
        assert [s.result.completion_tokens for s in seqs] == [20, 35]
        raw = raw_greedy(path, PROMPTS[2], 30, kv8=True)
        assert alone(engine, PROMPTS[2], 30).text == raw


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_starting_a_sequence_frees_the_cells_other_idle_slots_kept(tmp_path: Path) -> None:
    """Idle slots' cached cells would widen every later token's attention span in the unified cache: a new
    sequence keeps only the cells it reuses (one slot's), the other idle slots are emptied."""
    engine = LlamaEngine(write_tiny_llama(tmp_path / "m.gguf", tensor_type="Q8_0"), n_ctx=256, threads=1, parallel=3)
    engine.load()
    try:
        prompts = [engine.tokenize_prompt(p) for p in ("one two three", "four five six", "seven eight nine")]
        done: list[object] = []
        for tokens in prompts:  # three at once: three slots end holding their cells
            engine.start(tokens, SamplingParams(max_tokens=4, temperature=0), lambda _t: None, done.append)
        while engine.active:
            engine.step()
        assert sum(bool(s.tokens) for s in engine._slots) == 3
        engine.start(prompts[0], SamplingParams(max_tokens=2, temperature=0), lambda _t: None, done.append)
        assert sum(bool(s.tokens) for s in engine._slots) == 1
        while engine.active:
            engine.step()
    finally:
        engine.close()

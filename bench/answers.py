"""Answer quality of the demo model under different sampling: how often a factual answer is right, and
how often it runs away into repetition.

    python bench/answers.py [--model PATH] [--seeds N]

The engine alone, SmolLM2-135M-Instruct Q4_1 by default (what scripts/demo.sh serves), 4 slots, 48 tokens.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.engine.llama import GenerationResult, LlamaEngine, SamplingParams  # noqa: E402
from bench.models import smollm2  # noqa: E402

QUESTIONS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("How many legs does a spider have?", r"\beight\b|\b8\b"),
    ("What color is the sky on a clear day?", "blue"),
]
SAMPLING = [(0.2, 0.05, 1.1), (0.3, 0.05, 1.1), (0.7, 0.05, 1.1), (0.2, 0.0, 1.0)]  # temperature, min_p, repeat


def degenerate(text: str) -> bool:
    words = text.lower().split()
    return len(words) > 10 and len(set(words)) / len(words) < 0.4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a chat GGUF (default: SmolLM2-135M-Instruct Q4_1 from PyPI)")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    engine = LlamaEngine(args.model or smollm2().path, n_ctx=2048, threads=2, parallel=4)
    engine.load()
    for temperature, min_p, repeat in SAMPLING:
        right = runaway = total = 0
        for question, pattern in QUESTIONS:
            tokens = engine.tokenize_chat([{"role": "user", "content": question}])
            done: list[GenerationResult] = []
            for seed in range(args.seeds):
                if not engine.free_slots:
                    while engine.active:
                        engine.step()
                params = SamplingParams(max_tokens=48, seed=seed, temperature=temperature, min_p=min_p,
                                        repeat_penalty=repeat)
                engine.start(tokens, params, lambda _t: None, done.append)  # type: ignore[arg-type]
            while engine.active:
                engine.step()
            for result in done:
                total += 1
                right += bool(re.search(pattern, result.text.lower()))
                runaway += degenerate(result.text)
        print(f"temperature {temperature}, min_p {min_p}, repeat_penalty {repeat}: right {right}/{total}, "
              f"degenerate {runaway}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()

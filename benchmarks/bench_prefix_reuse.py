"""KV-prefix reuse on a multi-turn chat: each new turn shares the conversation so far with the
cached sequence, so only the new tokens are prefilled. Compares the time to first token of every
turn with reuse against a cold cache (the same request after `Model.reset()`), in one run, and
checks both produce the same tokens.

    python benchmarks/bench_prefix_reuse.py MODEL.gguf [--turns 4] [--backend c]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lite  # noqa: E402

QUESTIONS = [
    "Write a function that reverses a string.",
    "Now make it handle None by returning an empty string.",
    "Add a docstring and type hints.",
    "Write a unit test for it with unittest.",
    "Explain the time complexity.",
    "Rewrite it without slicing.",
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    m = lite.load(args.model, backend=args.backend)
    print(f"model {m.name}, backend {m.backend.name}", file=sys.stderr)
    messages: list[dict] = [{"role": "system", "content": "You are a helpful Python assistant."}]
    print(f"{'turn':>4} {'prompt tok':>10} {'reused':>7} {'warm ttft s':>12} {'cold ttft s':>12} {'speed-up':>9} same")
    speedups = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        ids = m.chat_prompt(messages)
        earlier = m.chat_prompt(messages[:-1])   # what the cache holds after the previous turn
        warm_t, cold_t = [], []
        for _ in range(args.repeats):
            m.reset()
            m.generate(earlier, max_tokens=1)     # not timed: recreates the previous turn's cache
            warm = m.generate(ids, max_tokens=args.max_tokens)
            warm_t.append(warm.timings["prompt_s"])
            m.reset()
            cold = m.generate(ids, max_tokens=args.max_tokens)
            cold_t.append(cold.timings["prompt_s"])
        w, c = statistics.median(warm_t), statistics.median(cold_t)
        speedups.append(c / w)
        print(f"{turn + 1:>4} {len(ids):>10} {warm.cached_tokens:>7} {w:>12.3f} {c:>12.3f} {c / w:>8.1f}x "
              f"{warm.token_ids == cold.token_ids}")
        messages.append({"role": "assistant", "content": warm.text})
    print(f"median speed-up of time to first token from turn 2 on: {statistics.median(speedups[1:]):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

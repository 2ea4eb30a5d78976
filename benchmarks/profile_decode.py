"""Python overhead of decode on a native backend (c, or cuda): the time per token spent outside
library calls, as a share of the token's time. Every `lite_*` call is timed through a thin proxy
on the library object (its own cost, ~0.3 µs a call, is charged to Python), and the per-function
call counts and times are listed. On cuda a kernel call returns once queued: its time is the
host's cost of a launch, and the GPU's time shows up in whatever waits (a copy back, a sync).
Optionally a cProfile listing of the Python side.

    python benchmarks/profile_decode.py MODEL.gguf [--backend c] [--tokens 16] [--threads 1] [--cprofile]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lite  # noqa: E402


class TimedLib:
    """Wraps a cffi library: each lite_* call adds its wall time to `spent[name]`."""

    def __init__(self, lib) -> None:
        self._lib = lib
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)
        if not callable(fn):
            return fn
        spent, calls, clock = self.spent, self.calls, time.perf_counter

        def timed(*args):
            t0 = clock()
            try:
                return fn(*args)
            finally:
                spent[name] += clock() - t0
                calls[name] += 1
        setattr(self, name, timed)   # later lookups skip __getattr__
        return timed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--backend", default="c", help="c or cuda (default c)")
    args = ap.parse_args()
    m = lite.load(args.model, backend=args.backend, n_ctx=args.prompt + (args.repeats + 1) * args.tokens + 8)
    be = m.backend
    if args.threads and hasattr(be, "set_threads"):
        be.set_threads(args.threads)
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, args.prompt)
    cache = m.new_cache()
    m.forward(ids, cache)
    for _ in range(3):      # warm: page in the experts these tokens touch
        m.forward([1], cache)
    timed = TimedLib(be.lib)
    be.lib = timed
    shares, per_tok = [], []
    for _ in range(args.repeats):
        timed.spent.clear()
        timed.calls.clear()
        t0 = time.perf_counter()
        tok = 1
        for _ in range(args.tokens):
            tok = int(np.argmax(m.forward([tok], cache)[-1]))
        wall = time.perf_counter() - t0
        c_time = sum(timed.spent.values())
        shares.append((wall - c_time) / wall)
        per_tok.append(wall / args.tokens)
    how = f" ({be.isa}, {be.threads} threads)" if hasattr(be, "threads") else ""
    print(f"backend {be.name}{how}, {m.config.n_layer} layers, {args.tokens} tokens x {args.repeats} runs")
    print(f"decode {1 / statistics.median(per_tok):.2f} tok/s; {statistics.median(per_tok) * 1e3:.1f} ms/token")
    print(f"python overhead {statistics.median(shares):.1%} of token time (runs: "
          f"{', '.join(f'{s:.1%}' for s in shares)}); "
          f"{(statistics.median(per_tok)) * statistics.median(shares) * 1e3:.2f} ms/token")
    n = args.tokens
    print(f"{'library function':28} {'calls/token':>12} {'ms/token':>9}")
    for name in sorted(timed.spent, key=lambda k: -timed.spent[k]):
        print(f"{name:28} {timed.calls[name] / n:12.1f} {timed.spent[name] / n * 1e3:9.2f}")
    be.lib = timed._lib
    if args.cprofile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.tokens):
            m.forward([1], cache)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())

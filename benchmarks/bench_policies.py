"""Expert-cache eviction policies on a recorded routing trace: hit rates of LRU, the
frequency-aware LFU-with-aging, the layer-cycle-aware policy and Belady's optimum (offline upper bound) at cache sizes of
12.5%, 25% and 50% of all routed experts.

    python benchmarks/bench_policies.py --trace routing.jsonl
    python benchmarks/bench_policies.py --model demo.gguf --text FILE [--tokens 512]   # records one

A trace from a model with learned routing (the demo model) shows real locality; random weights
route with almost none.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lite  # noqa: E402
from lite.trace import RoutingTrace  # noqa: E402
from lite.weights.policy import simulate  # noqa: E402


def record(model_path: str, text_file: str, tokens: int) -> tuple[RoutingTrace, int]:
    m = lite.load(model_path)
    ids = m.tokenize(Path(text_file).read_text(errors="replace"))[:tokens]
    trace = RoutingTrace()
    m.record_routing(trace)
    cache = m.new_cache()
    for t in ids:                      # token by token, as decode asks the pager
        if cache.length == m.n_ctx:    # a full context starts a new sequence, as a chat would
            cache = m.new_cache()
        m.forward([t], cache)
    moe_layers = sum(m.config.layer_is_moe(i) for i in range(m.config.n_layer))
    return trace, moe_layers * m.config.n_expert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace")
    ap.add_argument("--model")
    ap.add_argument("--text")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--save", help="write the recorded trace here")
    ap.add_argument("--experts", type=int, help="total routed experts (default: from the trace)")
    args = ap.parse_args()
    if args.trace:
        trace = RoutingTrace.load(args.trace)
        total = args.experts
    else:
        trace, total = record(args.model, args.text, args.tokens)
        if args.save:
            trace.save(args.save)
    steps = trace.decode_steps()
    if total is None:
        layers = {k[0] for s in steps for k in s}
        total = len(layers) * (max(k[1] for s in steps for k in s) + 1)
    print(f"{len(steps)} layer-steps, {total} routed experts in all", file=sys.stderr)
    names = ("lru", "lfu", "cycle")
    print(f"{'cache':>7} {'slots':>6} " + " ".join(f"{n:>7}" for n in names) + f" {'belady':>7} "
          + " ".join(f"{n + '/opt':>9}" for n in names))
    for frac in (0.125, 0.25, 0.5):
        cap = max(int(total * frac), max(len(s) for s in steps))
        r = {p: simulate(steps, cap, p) for p in (*names, "belady")}
        opt = r["belady"] or float("nan")
        print(f"{frac:>6.1%} {cap:>6} " + " ".join(f"{r[n]:>7.3f}" for n in names) + f" {r['belady']:>7.3f} "
              + " ".join(f"{r[n] / opt:>9.2f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

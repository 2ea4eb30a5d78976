"""Expert-cache eviction policies on routing traces: hit rates of LRU, the frequency-aware
LFU-with-aging, the layer-cycle policy (the default) and Belady's optimum (offline upper bound) at
cache sizes of 12.5%, 25% and 50% of all routed experts; then the layer-cycle policy with
next-layer prefetch replayed (where the trace holds the model's predictions): its hit rate and
reads per request against no prefetch.

The first columns are demand caching, as Belady's is: every read is a miss. The layer-cycle
policy is given the model's next-layer predictions there too, as hints of what to keep (it
reads nothing on them), so its ratio to Belady's is a fair one. The prefetch columns read
guesses ahead: hits there can pass Belady's demand optimum, at the cost of reads ("+pf").

    python benchmarks/bench_policies.py --model demo --text heldout [--tokens N] [--save FILE]
    python benchmarks/bench_policies.py --trace routing.jsonl
    python benchmarks/bench_policies.py --synthetic

A recorded trace is split in halves, each reported on its own: the policy's constants were
chosen on the first half of the demo model's held-out text, so the second is the honest test.
The demo model's routing is learned (real locality); `--synthetic` adds traces of known shape
(uniform random routing, and popular experts with reuse of the last token's) so a choice that
only fits one model shows up.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lite  # noqa: E402
from lite.trace import RoutingTrace  # noqa: E402
from lite.weights.policy import POLICIES, simulate  # noqa: E402

Steps = list[list[tuple[int, int]]]


def heldout_text() -> str:
    """The demo model's held-out files (never trained on), from this Python's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = (ROOT / "lite" / "demo" / "heldout.txt").read_text().split()
    return "\n\n".join((stdlib / n).read_text(encoding="utf-8", errors="replace") for n in names)


def record(model_path: str, text: str, tokens: int | None) -> tuple[RoutingTrace, int]:
    """Decode `text` token by token, as decode asks the pager, recording routing and the
    model's next-layer predictions (which it makes only with an expert pager, hence the budget
    that holds everything)."""
    m = lite.load(model_path, ram_budget=10**15)
    ids = m.tokenize(text)[:tokens]
    trace = RoutingTrace()
    m.record_routing(trace)
    m.experts.on_prediction = trace.guess_hook
    # Everything is resident, so the pager would pause predictions that read nothing: record
    # one for every layer-step, as a pager under a small budget would make them.
    m.experts.wants_guess = lambda layer: True
    cache = m.new_cache()
    for n, t in enumerate(ids):
        if cache.length == m.n_ctx:    # a full context starts a new sequence, as a chat would
            cache = m.new_cache()
        m.forward([t], cache)
        if n % 5000 == 4999:
            print(f"  {n + 1} of {len(ids)} tokens", file=sys.stderr)
    moe_layers = sum(m.config.layer_is_moe(i) for i in range(m.config.n_layer))
    return trace, moe_layers * m.config.n_expert


def synthetic(kind: str, n_layers: int, n_expert: int, k: int, tokens: int, accuracy: float,
              seed: int = 0) -> tuple[Steps, Steps]:
    """(steps, guesses) in decode order. kind "uniform": every token picks k experts at random;
    "sticky": each of the last token's experts is kept with chance 0.3, the rest drawn with
    Zipf(1) popularity (a different ranking per layer). Guesses name each used expert with
    probability `accuracy`, else a random one."""
    rng = np.random.default_rng(seed)
    rank = [rng.permutation(n_expert) for _ in range(n_layers)]
    zipf = 1.0 / np.arange(1, n_expert + 1)
    zipf /= zipf.sum()
    prev: list[list[int]] = [[] for _ in range(n_layers)]
    steps: Steps = []
    guesses: Steps = []
    for _ in range(tokens):
        for layer in range(n_layers):
            if kind == "uniform":
                ids = [int(e) for e in rng.choice(n_expert, k, replace=False)]
            else:
                ids = [e for e in prev[layer] if rng.random() < 0.3]
                while len(ids) < k:
                    e = int(rank[layer][rng.choice(n_expert, p=zipf)])
                    if e not in ids:
                        ids.append(e)
            prev[layer] = ids
            guess = [e if rng.random() < accuracy else int(rng.integers(n_expert)) for e in ids]
            steps.append([(layer, e) for e in sorted(ids)])
            guesses.append([(layer, e) for e in dict.fromkeys(guess)])
    return steps, guesses


def table(title: str, steps: Steps, guesses: Steps | None, total: int) -> None:
    print(f"\n{title}: {len(steps)} layer-steps, {total} routed experts in all")
    if guesses is not None and any(guesses):
        per_layer: dict[int, list[int]] = {}
        for step, guess in zip(steps, guesses):
            if guess:
                right = per_layer.setdefault(step[0][0], [0, 0])
                right[0] += len({k[1] for k in guess} & {k[1] for k in step})
                right[1] += len(step)
        print("next-layer prediction accuracy (share of used experts that were predicted): "
              + ", ".join(f"layer {layer} {r / n:.2f}" for layer, (r, n) in sorted(per_layer.items()))
              + f"; all {sum(r for r, _ in per_layer.values()) / sum(n for _, n in per_layer.values()):.2f}")
    else:
        guesses = None
    head = f"{'cache':>7} {'slots':>6} " + " ".join(f"{n:>7}" for n in POLICIES) + f" {'belady':>7} " \
        + " ".join(f"{n + '/opt':>9}" for n in POLICIES)
    if guesses is not None:
        head += f" | {'cycle+pf':>8} {'/opt':>5} {'reads/req':>9} {'+pf':>6} {'pf used':>7}"
    print(head)
    for frac in (0.125, 0.25, 0.5):
        cap = max(int(total * frac), max(len(s) for s in steps))
        r = {p: simulate(steps, cap, p, guesses, prefetch=False) for p in (*POLICIES, "belady")}
        opt = r["belady"].hit_rate or float("nan")
        line = f"{frac:>6.1%} {cap:>6} " + " ".join(f"{r[n].hit_rate:>7.3f}" for n in POLICIES) \
            + f" {r['belady'].hit_rate:>7.3f} " + " ".join(f"{r[n].hit_rate / opt:>9.2f}" for n in POLICIES)
        if guesses is not None:
            pf = simulate(steps, cap, "cycle", guesses)
            used = pf.prefetch_used / pf.prefetch_reads if pf.prefetch_reads else float("nan")
            line += f" | {pf.hit_rate:>8.3f} {pf.hit_rate / opt:>5.2f} {r['cycle'].reads_per_request:>9.3f} " \
                    f"{pf.reads_per_request:>6.3f} {used:>7.2f}"
        print(line, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", help="a recorded routing trace (JSON lines, see lite.trace)")
    ap.add_argument("--model", help="GGUF file to record a trace with; 'demo' for the bundled demo model")
    ap.add_argument("--text", help="text file to decode; 'heldout' for the demo model's held-out files")
    ap.add_argument("--tokens", type=int, default=None, help="decode at most this many tokens (default: all)")
    ap.add_argument("--save", help="write the recorded trace here")
    ap.add_argument("--experts", type=int, help="total routed experts (default: from the trace)")
    ap.add_argument("--synthetic", action="store_true", help="also (or only) report synthetic traces")
    args = ap.parse_args()
    if args.trace or args.model:
        if args.trace:
            trace, total = RoutingTrace.load(args.trace), args.experts
        else:
            if args.model == "demo":
                from lite.cli import demo_model_path
                args.model = str(demo_model_path())
            text = heldout_text() if args.text == "heldout" else Path(args.text).read_text(errors="replace")
            trace, total = record(args.model, text, args.tokens)
            if args.save:
                trace.save(args.save)
        steps, guesses = trace.decode_steps(), trace.decode_guesses()
        if total is None:
            total = len({k[0] for s in steps for k in s}) * (max(k[1] for s in steps for k in s) + 1)
        half = len(steps) // 2
        table("first half (policy constants tuned here)", steps[:half], guesses[:half], total)
        table("second half (held out from tuning)", steps[half:], guesses[half:], total)
    elif not args.synthetic:
        ap.error("give --trace, --model and --text, or --synthetic")
    if args.synthetic:
        for kind, layers, experts, k, tokens in (("uniform", 3, 8, 2, 10000), ("uniform", 12, 32, 4, 800),
                                                 ("sticky", 12, 32, 4, 800)):
            steps, guesses = synthetic(kind, layers, experts, k, tokens, accuracy=0.6)
            table(f"synthetic {kind}, {layers} layers of {experts} experts, top-{k}, guesses right 60%",
                  steps, guesses, layers * experts)
    return 0


if __name__ == "__main__":
    sys.exit(main())

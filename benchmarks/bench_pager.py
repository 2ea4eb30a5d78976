"""Expert pager benchmark on a synthetic Coder-V2-Lite-dims GGUF, cold (page cache dropped) and
confined to a cgroup-v1 memory limit, so no figure is flattered by cached pages.

For budgets of 100%, 50% and 25% of the routed-expert bytes (plus the resident tensors) it runs
decode in a child process and reports tok/s, hit rate, bytes read per token, time stalled on
I/O and peak RSS, against the disk-limited bound (bytes read per token ÷ the O_DIRECT read
bandwidth measured here, plus the compute time per token measured with everything in RAM).
Then the same file in `mmap` mode inside a cgroup of the 50% budget's size, for the ratio.

    python benchmarks/bench_pager.py MODEL.gguf [--tokens 16] [--fractions 1 0.5 0.25]

Needs root (drop_caches, cgroups). Results table on stdout, progress on stderr.

    python benchmarks/bench_pager.py --prefetch-ab demo [--fraction 0.5] [--rounds 300]

instead compares decode with next-layer prefetch on and off at one budget, in one process (no
root): two copies of the model decode the same text (the demo model's held-out files, else
random tokens) in alternating short segments, so that load from other processes falls on both
alike; it reports median tok/s, the median of the paired speed ratios, and where the time went.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CGROUP = Path("/sys/fs/cgroup/memory/lite_bench_pager")

CHILD = r"""
import json, resource, sys, time
import numpy as np
import lite
path, budget, tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[5])
prefetch = sys.argv[4] == "1"
t0 = time.perf_counter()
m = lite.load(path, ram_budget=None if budget == "mmap" else int(budget), n_ctx=prompt + tokens + 8, prefetch=prefetch)
load_s = time.perf_counter() - t0
cache = m.new_cache()
rng = np.random.default_rng(0)
logits = m.forward(rng.integers(0, m.config.vocab_size, prompt), cache)
before = dict(m.stats)
times = []
for _ in range(tokens):
    # Random tokens, not greedy: a random-weight model's greedy output repeats itself, and
    # repeated tokens route identically, which would flatter every cache.
    tok = int(rng.integers(0, m.config.vocab_size))
    t = time.perf_counter()
    logits = m.forward([tok], cache)
    times.append(time.perf_counter() - t)
st = m.stats
out = {"load_s": load_s, "times": times, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
for k in ("expert_hits", "expert_misses", "bytes_read", "io_stall_s", "expert_prefetch_hits",
          "expert_prefetch_issued", "resident_bytes"):
    if k in st:
        out[k] = st[k] - before.get(k, 0) if k != "resident_bytes" else st[k]
out["prefetch_accuracy"] = st.get("prefetch_accuracy")
print(json.dumps(out))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def direct_read_bandwidth(path: Path, block: int, threads: int = 4, nbytes: int = 2 << 30) -> float:
    """O_DIRECT read bandwidth of the model file in the pager's own pattern: `threads` readers of
    expert-sized blocks at random page-aligned offsets, in bytes/s."""
    import random
    from concurrent.futures import ThreadPoolExecutor
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.path.getsize(path)
    rnd = random.Random(0)
    offsets = [rnd.randrange(0, (size - block) // 4096) * 4096 for _ in range(max(1, nbytes // block))]

    def reader(part: list[int]) -> int:
        buf = mmap.mmap(-1, block)
        try:
            return sum(os.preadv(fd, [buf], off) for off in part)
        finally:
            buf.close()
    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            done = sum(ex.map(reader, [offsets[i::threads] for i in range(threads)]))
        return done / (time.perf_counter() - t)
    finally:
        os.close(fd)


def cgroup_limit(budget: int) -> int:
    """The memory cgroup for a run: the budget + 10%, plus the interpreter and its libraries
    (numpy, numba, cffi: ~400 MB), which no weight budget covers. Page cache counts too."""
    return int(budget * 1.1) + (400 << 20)


def run_child(path: Path, budget: str, tokens: int, limit: int | None, prefetch: bool = True, prompt: int = 4) -> dict:
    """Decode `tokens` random tokens after a `prompt`-token prefill (a prefill reads every expert
    its tokens route to, so a few hundred tokens fill a pool that holds them all)."""
    cmd = [sys.executable, "-c", CHILD, str(path), budget, str(tokens), "1" if prefetch else "0", str(prompt)]
    if limit is not None:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
        (CGROUP / "memory.max_usage_in_bytes").write_text("0")
        cmd = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$0" "$@"', *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}): {r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if limit is not None:
        out["cgroup_peak"] = int((CGROUP / "memory.max_usage_in_bytes").read_text())
    return out


def prefetch_ab(model: str, fraction: float, policy: str, segment: int, rounds: int) -> None:
    """Prefetch on against off at `fraction` of the routed-expert bytes (see the module doc)."""
    import dataclasses
    import lite
    from lite.weights.pager import ExpertPager
    if model == "demo":
        from bench_policies import heldout_text
        from lite.cli import demo_model_path
        path, text = demo_model_path(), heldout_text()
    else:
        path, text = Path(model), None
    probe = ExpertPager(lite.load(path).file, 1 << 50)
    budget = probe.resident_bytes + max(int(fraction * probe.n_slots), probe.K) * probe.slot_bytes
    probe.close()
    models = {on: lite.load(path, ram_budget=budget, expert_policy=policy, prefetch=on) for on in (False, True)}
    m0 = models[False]
    if text is not None:
        ids = m0.tokenize(text)
    else:
        ids = [int(t) for t in np.random.default_rng(0).integers(0, m0.config.vocab_size, segment * (rounds + 20))]
    need = segment * (rounds + 20)
    ids = (ids * (need // len(ids) + 1))[:need]
    caches = {on: m.new_cache() for on, m in models.items()}
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu = {False: 0.0, True: 0.0}

    def run(on: bool, toks: list[int]) -> None:
        m = models[on]
        t, c = time.perf_counter(), time.thread_time()
        for tok in toks:
            if caches[on].length == m.n_ctx:
                caches[on] = m.new_cache()
            m.forward([tok], caches[on])
        wall[on].append(time.perf_counter() - t)
        cpu[on] += time.thread_time() - c

    for on in (False, True):                     # warm-up: fill the caches
        run(on, ids[:20 * segment])
    before = {on: dataclasses.replace(m.experts.stats) for on, m in models.items()}
    for on in (False, True):
        wall[on].clear()
        cpu[on] = 0.0
    for r in range(rounds):
        toks = ids[(20 + r) * segment:(21 + r) * segment]
        for on in ((False, True) if r % 2 == 0 else (True, False)):
            run(on, toks)
    n = segment * rounds
    ratio = statistics.median(off / on for off, on in zip(wall[False], wall[True]))
    print(f"{path.name}: {m0.experts.n_slots} expert slots ({fraction:.0%} of {probe.n_slots}), policy "
          f"{policy}; {rounds} rounds of {segment} decode tokens, prefetch off and on alternating")
    print(f"{'prefetch':>8} {'tok/s':>7} {'hit':>6} {'miss/tok':>8} {'pf/tok':>7} {'declined':>8} "
          f"{'stall ms':>8} {'CPU ms':>7} {'pred acc':>8}")
    for on, m in models.items():
        st, b = m.experts.stats, before[on]
        hits, misses = st.hits - b.hits, st.misses - b.misses
        guessed = st.predicted - b.predicted
        acc = (st.predicted_right - b.predicted_right) / guessed if guessed else None
        print(f"{'on' if on else 'off':>8} {segment / statistics.median(wall[on]):>7.1f} "
              f"{hits / (hits + misses):>6.3f} "
              f"{misses / n:>8.2f} {(st.prefetch_issued - b.prefetch_issued) / n:>7.2f} "
              f"{(st.prefetch_declined - b.prefetch_declined) / n:>8.2f} {(st.stall_s - b.stall_s) / n * 1e3:>8.2f} "
              f"{cpu[on] / n * 1e3:>7.2f} {'-' if acc is None else format(acc, '.3f'):>8}")
    print(f"speed with prefetch / without: {ratio:.2f}x (median of {rounds} paired segments)")
    print("(stall: time the compute thread waited for reads; CPU: the compute thread's own CPU time)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prefetch-ab", metavar="MODEL", help="compare prefetch on/off on MODEL ('demo': the bundled one)")
    ap.add_argument("--fraction", type=float, default=0.5, help="--prefetch-ab: budget as a share of the experts")
    ap.add_argument("--policy", default="cycle", help="--prefetch-ab: eviction policy")
    ap.add_argument("--segment", type=int, default=10, help="--prefetch-ab: tokens per segment")
    ap.add_argument("--rounds", type=int, default=300, help="--prefetch-ab: segments per setting")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if args.prefetch_ab:
        prefetch_ab(args.prefetch_ab, args.fraction, args.policy, args.segment, args.rounds)
        return 0
    if args.model is None:
        ap.error("give MODEL (or --prefetch-ab MODEL)")
    from lite.weights.gguf_file import open_model_file
    from lite.weights.pager import ExpertPager
    mf = open_model_file(args.model)
    probe = ExpertPager(mf, 1 << 50)
    resident, slot = probe.resident_bytes, probe.slot_bytes
    n_experts = probe.n_slots
    probe.close()
    expert_bytes = n_experts * slot
    log(f"resident {resident / 2**30:.2f} GiB, experts {expert_bytes / 2**30:.2f} GiB in {n_experts} slots")
    drop_caches()
    block = -(-slot // 3 // 4096) * 4096
    bws = [direct_read_bandwidth(args.model, block)]
    log(f"O_DIRECT read, 4 threads, expert-sized random blocks: {bws[0] / 1e9:.2f} GB/s")

    # Compute time per token with every expert in the pool: a 256-token prefill routes to all of
    # them (random routing misses one of 64 with 256 tokens' top-6 at odds (58/64)^256 ~ 1e-11); only the
    # decode after it is timed. Without that prefill a 2x16-token run was still reading experts
    # in its second half, and its "compute" time was 4x the real one.
    log("warm run (every expert in the pool) for the compute time per token")
    warm = run_child(args.model, str(resident + expert_bytes + (64 << 20)), args.tokens, None, prompt=256)
    if warm["expert_misses"]:
        log(f"warning: the warm run still missed {warm['expert_misses']} experts")
    compute_s = statistics.median(warm["times"])

    rows = []
    for frac in args.fractions:
        budget = resident + int(frac * expert_bytes)
        for prefetch in (True, False) if frac == 0.5 else (True,):
            drop_caches()
            log(f"budget {frac:.0%} ({budget / 2**30:.2f} GiB), prefetch {'on' if prefetch else 'off'}, cold")
            r = run_child(args.model, str(budget), args.tokens, cgroup_limit(budget), prefetch)
            n = args.tokens
            per_tok_bytes = r["bytes_read"] / n
            tok_s = n / sum(r["times"])
            rows.append({"mode": "budget", "fraction": frac, "prefetch": prefetch, "budget": budget,
                         "tok_s": tok_s,
                         "hit_rate": r["expert_hits"] / max(1, r["expert_hits"] + r["expert_misses"]),
                         "bytes_per_token": per_tok_bytes, "stall_s_per_token": r["io_stall_s"] / n,
                         "prefetch_accuracy": r["prefetch_accuracy"], "peak_rss": r["peak_rss"],
                         "rss_over_budget": r["peak_rss"] / budget, "cgroup_peak": r["cgroup_peak"]})
    half = resident + int(0.5 * expert_bytes)
    drop_caches()
    log(f"mmap mode in the 50% budget's cgroup ({cgroup_limit(half) / 2**30:.2f} GiB), cold")
    r = run_child(args.model, "mmap", args.tokens, cgroup_limit(half))
    mm_tok_s = args.tokens / sum(r["times"])
    rows.append({"mode": "mmap", "fraction": 0.5, "budget": half, "tok_s": mm_tok_s, "peak_rss": r["peak_rss"],
                 "cgroup_peak": r["cgroup_peak"]})
    CGROUP.rmdir()
    # Disk speed moves on a shared machine (0.09 and 1.1 GB/s minutes apart here): probed again
    # after the runs, and the faster reading bounds them, so no bound is lowered by a slow probe.
    bws.append(direct_read_bandwidth(args.model, block))
    log(f"O_DIRECT read again: {bws[1] / 1e9:.2f} GB/s")
    bw = max(bws)
    for x in rows:
        if x["mode"] == "budget":
            x["bound_tok_s"] = 1.0 / (x["bytes_per_token"] / bw + compute_s)
            x["of_bound"] = x["tok_s"] / x["bound_tok_s"]

    result = {"model": str(args.model), "o_direct_gbs": bw / 1e9, "o_direct_probes_gbs": [b / 1e9 for b in bws],
              "compute_s_per_token": compute_s,
              "warm_tok_s": 1 / compute_s, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"O_DIRECT read (4 threads, expert-sized blocks) {bw / 1e9:.2f} GB/s (the faster of "
          f"{' and '.join(f'{b / 1e9:.2f}' for b in bws)}); compute {compute_s * 1e3:.0f} ms/token "
          f"({1 / compute_s:.2f} tok/s with all experts in RAM); {args.tokens} decode tokens, cold")
    print(f"{'mode':<7} {'budget':>7} {'pf':>3} {'tok/s':>7} {'bound':>7} {'%bound':>7} {'hit':>6} "
          f"{'MB/tok':>8} {'stall ms':>9} {'pred':>6} {'RSS GiB':>8} {'RSS/bud':>8}")
    for x in rows:
        if x["mode"] == "mmap":
            print(f"{'mmap':<7} {'50%':>7} {'-':>3} {x['tok_s']:>7.2f} {'':>7} {'':>7} {'':>6} {'':>8} "
                  f"{'':>9} {'':>6} {x['peak_rss'] / 2**30:>8.2f}")
            continue
        pred = f"{x['prefetch_accuracy']:.2f}" if x["prefetch_accuracy"] is not None else "-"
        print(f"{'budget':<7} {x['fraction']:>6.0%} {'on' if x['prefetch'] else 'off':>3} {x['tok_s']:>7.2f} "
              f"{x['bound_tok_s']:>7.2f} {x['of_bound']:>6.0%} {x['hit_rate']:>6.2f} "
              f"{x['bytes_per_token'] / 1e6:>8.1f} {x['stall_s_per_token'] * 1e3:>9.1f} {pred:>6} "
              f"{x['peak_rss'] / 2**30:>8.2f} {x['rss_over_budget']:>8.2f}")
    b50 = [x for x in rows if x["mode"] == "budget" and x["fraction"] == 0.5 and x["prefetch"]]
    if b50:
        print(f"budget pager vs mmap in the same cgroup (50%): {b50[0]['tok_s'] / mm_tok_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

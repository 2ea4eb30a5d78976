"""`lite bench`: load time, prefill speed and time to first token, greedy decode speed (also at
given cache depths), peak RSS, and the decode roofline of this machine — memory read bandwidth
divided by the bytes one decode token must read.

    r = run_bench("model.gguf", prompt=256, gen=32, depths=(1024,), repeats=3)

Token ids are random (no tokenizer needed, so synthetic models work). Every timing is the median
of `repeats` runs on a fresh cache, after one untimed warm-up run (prompt and two decode steps) as
llama-bench does: the first touches of scratch memory are not what each prompt costs. The timed
prefills run back to back, as llama-bench's repetitions do; then each decode follows an untimed
prefill of its prompt and is followed by its bandwidth probe. Progress goes to stderr; the table
(or, with `json_out`, one JSON object) to stdout.

Active bytes per decode token: every non-expert tensor (attention, norms, routers, shared experts,
the dense layers, the output projection) in full, one row of the embedding table, and K routed
experts' gate/up/down slices per MoE layer. At cache depth S the latent cache adds S·(C+R)·4
bytes per layer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np

from .model.tensors import is_expert_tensor
from .trace import RoutingTrace

BANDWIDTH_BYTES = 1 << 30


def _log(msg: str) -> None:
    print(f"lite bench: {msg}", file=sys.stderr, flush=True)


def active_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode token reads (see the module docstring)."""
    cfg, tensors = model.config, model.file.tensors
    total = 0
    for name, t in tensors.items():
        if name == "token_embd.weight":
            total += t.row_bytes
        elif is_expert_tensor(name):
            total += cfg.n_expert_used * (t.nbytes // t.shape[0])
        else:
            total += t.nbytes
    return int(total)


def _numpy_read(buf: np.ndarray, threads: int) -> None:
    parts = np.array_split(buf.view(np.uint64), threads)
    if threads == 1:
        np.bitwise_or.reduce(parts[0])
        return
    ths = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]   # the ufunc drops the GIL
    for t in ths:
        t.start()
    for t in ths:
        t.join()


def measure_bandwidth(threads: int | None = None, nbytes: int = BANDWIDTH_BYTES, repeats: int = 3) -> tuple[float, str]:
    """Memory read bandwidth in GB/s (median of `repeats` passes over an `nbytes` buffer that is
    far larger than any cache) and how it was measured. Uses the C library's threaded reader when
    it is built, else numpy in threads."""
    threads = threads or os.cpu_count() or 1
    buf = np.ones(nbytes // 8, np.uint64).view(np.uint8)   # written once: pages are resident
    reader, how = None, f"numpy, {threads} threads"
    try:
        from .kernels.c import read_bytes
        reader, how = (lambda: read_bytes(buf, threads)), f"C, {threads} threads"
    except ImportError:
        pass
    if reader is None:
        def reader() -> None:
            _numpy_read(buf, threads)
    reader()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reader()
        times.append(time.perf_counter() - t0)
    return buf.nbytes / statistics.median(times) / 1e9, how


def measure_bandwidth_isolated(threads: int | None = None, nbytes: int = BANDWIDTH_BYTES) -> tuple[float, str]:
    """`measure_bandwidth` in a child process, so that its buffer (1 GiB by default) does not
    count in this process's peak RSS, which the benchmark reports for the model alone."""
    code = ("import json, sys; from lite.bench import measure_bandwidth; "
            f"print(json.dumps(measure_bandwidth({threads!r}, {int(nbytes)})))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bandwidth probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    bw, how = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(bw), how


def _fill_cache(model: Any, cache: Any, depth: int, rng: np.random.Generator, room: int = 1) -> None:
    """Put `depth` random positions into `cache` without running the model: normalised latents
    (RMS 1, like `attn_kv_a_norm`'s output) and rope keys; storage for `room` more positions is
    made now, as generation sizes the cache for a whole request before it starts."""
    c = model.config
    cache.reserve(depth + room)
    for layer in range(c.n_layer):
        cache.write(layer, 0, rng.standard_normal((depth, c.kv_lora_rank), dtype=np.float32),
                    rng.standard_normal((depth, c.qk_rope), dtype=np.float32))
    cache.length = depth
    cache.token_ids = [0] * depth


def _prefill(model: Any, cache: Any, ids: np.ndarray) -> np.ndarray:
    """The prompt in the steps `generate` takes; the last step's logits."""
    from .generate import PREFILL_CHUNK
    for s in range(0, len(ids), PREFILL_CHUNK):
        logits = model.forward(ids[s:s + PREFILL_CHUNK], cache)
    return logits


def _fresh_prefill(model: Any, ids: np.ndarray, room: int) -> tuple[Any, np.ndarray]:
    """A new cache with room for `room` more tokens after the prompt, and the prompt's last logits."""
    cache = model.new_cache()
    cache.reserve(len(ids) + room)
    return cache, _prefill(model, cache, ids)


def _decode(model: Any, cache: Any, first: int, n: int) -> float:
    """Greedy decode `n` tokens one at a time after `first`; seconds."""
    tok = first
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model.forward([tok], cache)
        tok = int(np.argmax(logits[-1]))
    return time.perf_counter() - t0


def _set_threads(backend: Any, threads: int | None) -> None:
    if threads is None:
        return
    if hasattr(backend, "set_threads"):
        backend.set_threads(threads)
    else:
        try:
            import numba
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass


def run_bench(model_path: str | os.PathLike[str], prompt: int = 256, gen: int = 32, threads: int | None = None,
              backend: str | None = None, depths: Sequence[int] = (), json_out: bool = False,
              repeats: int = 3, bandwidth: bool = True, out: Any = None,
              bandwidth_bytes: int = BANDWIDTH_BYTES, ram_budget: str | int | None = None,
              trace: str | os.PathLike[str] | None = None,
              vram_budget: str | int | None = None, warmup: bool = True) -> dict[str, Any]:
    """Benchmark a model file; print the table or JSON to `out` (stdout) and return the results.
    With `ram_budget` the expert pager's statistics are included; with `trace` every MoE layer's
    routing choices are written to that file (JSON lines, see lite.trace; not the warm-up's). The
    pager's statistics count the warm-up run too."""
    from . import load

    if prompt < 1 or gen < 1 or repeats < 1 or any(d < 1 for d in depths):
        raise ValueError("prompt, gen, repeats and depths must be positive")
    out = out or sys.stdout
    n_ctx = max([prompt + gen + 1] + [d + gen + 1 for d in depths])
    _log(f"loading {model_path}")
    t0 = time.perf_counter()
    m = load(model_path, backend=backend, n_ctx=n_ctx, ram_budget=ram_budget, vram_budget=vram_budget)
    load_s = time.perf_counter() - t0
    be = m.backend
    _set_threads(be, threads)
    cfg = m.config
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, prompt)

    if warmup:
        cache = m.new_cache()
        _decode(m, cache, int(np.argmax(_prefill(m, cache, ids)[-1])), 2)
        _log("warm-up run done")
    recorder = RoutingTrace() if trace is not None else None
    m.record_routing(recorder)
    prefill_s, ttft_s, decode_s, bw_runs = [], [], [], []
    bw_threads = threads or getattr(be, "threads", None)
    # The timed prefills back to back, as llama-bench runs its repetitions: in one process, a
    # 256-token prefill right after the bandwidth probe (1 GiB read by another process) ran ~5%
    # slower than one right after another prefill, and one after 2 s idle ~3%.
    for r in range(repeats):
        t0 = time.perf_counter()
        _, logits = _fresh_prefill(m, ids, gen)
        t1 = time.perf_counter()
        np.argmax(logits[-1])   # choosing the first token is part of the time to it
        ttft_s.append(time.perf_counter() - t0)
        prefill_s.append(t1 - t0)
        _log(f"prefill run {r + 1}/{repeats}: {prompt / prefill_s[-1]:.2f} tok/s")
    for r in range(repeats):
        cache, logits = _fresh_prefill(m, ids, gen)   # each decode follows its prompt, as in use
        decode_s.append(_decode(m, cache, int(np.argmax(logits[-1])), gen))
        # The probe right after each decode: on a shared machine the bandwidth moves by 40% within
        # minutes, and a decode is only comparable with a bandwidth read in the same minute.
        if bandwidth:
            bw_runs.append(measure_bandwidth_isolated(bw_threads, bandwidth_bytes))
        _log(f"decode run {r + 1}/{repeats}: {gen / decode_s[-1]:.2f} tok/s"
             + (f", bandwidth {bw_runs[-1][0]:.1f} GB/s" if bandwidth else ""))
    depth_rows = []
    for d in depths:
        times = []
        for _ in range(repeats):
            cache = m.new_cache()
            _fill_cache(m, cache, d, rng, room=gen)
            times.append(_decode(m, cache, int(rng.integers(cfg.vocab_size)), gen))
        depth_rows.append({"depth": d, "decode_tok_s": gen / statistics.median(times)})
        _log(f"depth {d}: decode {depth_rows[-1]['decode_tok_s']:.2f} tok/s")

    active = active_bytes_per_token(m)
    res: dict[str, Any] = {
        "model": str(m.path), "model_name": m.name, "file_bytes": m.file.file_size,
        "backend": be.name, "threads": getattr(be, "threads", threads), "isa": getattr(be, "isa", None),
        "prefetch": getattr(be, "prefetch", None),
        "prompt_tokens": prompt, "gen_tokens": gen, "repeats": repeats,
        "load_s": load_s,
        "prefill_tok_s": prompt / statistics.median(prefill_s),
        "ttft_s": statistics.median(ttft_s),
        "decode_tok_s": gen / statistics.median(decode_s),
        "prefill_s_runs": prefill_s, "decode_s_runs": decode_s,
        "active_bytes_per_token": active,
        "depths": depth_rows,
    }
    if bandwidth:
        bw, how = statistics.median(b for b, _ in bw_runs), bw_runs[0][1]
        fraction = statistics.median(gen / t / (b * 1e9 / active) for t, (b, _) in zip(decode_s, bw_runs))
        res.update(bandwidth_gbs=bw, bandwidth_method=how, roofline_decode_tok_s=bw * 1e9 / active,
                   bandwidth_gbs_runs=[b for b, _ in bw_runs], decode_roofline_fraction=fraction)
        kv_per_pos = cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope) * 4
        for row in depth_rows:
            row["roofline_decode_tok_s"] = bw * 1e9 / (active + row["depth"] * kv_per_pos)
    else:
        res.update(bandwidth_gbs=None, bandwidth_method=None, roofline_decode_tok_s=None, decode_roofline_fraction=None)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    st = m.stats
    res["experts"] = {k: v for k, v in st.items() if k.startswith(("expert_", "bytes_read", "io_stall",
                                                                     "resident", "ram_budget", "prefetch"))}
    if "gpu" in st:
        res["gpu"] = st["gpu"]
    if recorder is not None:
        recorder.save(trace)
        _log(f"wrote {len(recorder.records)} routing records to {trace}")
    if json_out:
        print(json.dumps(res), file=out)
    else:
        print(format_table(res), file=out)
    return res


def format_table(r: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".2f") -> str:
        return "n/a" if v is None else format(v, spec)

    roof = r["roofline_decode_tok_s"]
    lines = [
        f"model        {r['model']} ({r['file_bytes'] / 2**30:.2f} GiB)",
        f"backend      {r['backend']}"
        + (f" ({r['isa']}, prefetch to {r['prefetch']}, {r['threads']} threads)" if r.get("isa") else ""),
        f"load         {r['load_s']:.2f} s",
        f"prefill      {r['prefill_tok_s']:.2f} tok/s ({r['prompt_tokens']} tokens; time to first token {r['ttft_s']:.2f} s)",
        f"decode       {r['decode_tok_s']:.2f} tok/s ({r['gen_tokens']} tokens, greedy)"
        + (f"  = {r['decode_roofline_fraction']:.0%} of roofline (median of each run against its own probe)"
           if r.get("decode_roofline_fraction") else ""),
    ]
    for row in r["depths"]:
        lines.append(f"  at depth {row['depth']:<6} {row['decode_tok_s']:.2f} tok/s"
                     + (f" (roofline {row['roofline_decode_tok_s']:.2f})" if row.get("roofline_decode_tok_s") else ""))
    lines += [
        f"active bytes {r['active_bytes_per_token'] / 2**30:.3f} GiB per decode token",
        f"bandwidth    {f(r['bandwidth_gbs'], '.1f')} GB/s read ({r['bandwidth_method'] or 'not measured'})",
        f"roofline     {f(roof)} tok/s decode (bandwidth / active bytes)",
        f"peak RSS     {r['peak_rss_bytes'] / 2**30:.2f} GiB",
    ]
    e = r.get("experts", {})
    if e.get("expert_mode") == "budget":
        lines += [
            f"experts      {e['expert_policy']} cache of {e['expert_slots']} slots, hit rate {e['expert_hit_rate']:.2f} "
            f"({e['expert_hits']} hits, {e['expert_misses']} misses, {e['expert_prefetch_hits']} by prefetch), "
            f"{e['bytes_read'] / 2**30:.2f} GiB read, {e['io_stall_s']:.2f} s stalled",
            f"RAM          {e['resident_bytes'] / 2**30:.2f} GiB resident of a {e['ram_budget_bytes'] / 2**30:.2f} GiB budget",
        ]
    g = r.get("gpu")
    if g:
        lines.append(
            f"GPU          {g['device']}: {g['resident_bytes'] / 2**30:.2f} GiB resident + {g['expert_bytes'] / 2**30:.2f} GiB "
            f"of experts cached (budget {g['vram_budget_bytes'] / 2**30:.2f} GiB); experts {g['expert_hits']} hits, "
            f"{g['expert_misses']} misses, {g['expert_evictions']} evictions, {g['cpu_experts']} on the CPU; "
            f"{g['uploaded_bytes'] / 2**30:.2f} GiB uploaded, {g['streamed_bytes'] / 2**30:.2f} GiB streamed")
    lines.append(f"(medians of {r['repeats']} runs)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `lite bench` flags."""
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens to prefill (default 256)")
    p.add_argument("--gen", type=int, default=32, help="tokens to decode (default 32)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: all cores)")
    p.add_argument("--backend", default=None, help="reference, numba, c or cuda (default: best available)")
    p.add_argument("--depth", type=int, action="append", default=[], metavar="D",
                   help="also time decode with D positions already cached (repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported (default 3)")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth probe")
    p.add_argument("--no-warmup", action="store_true", help="time the first run too (default: one untimed run first)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--ram-budget", default=None, help="RAM budget for the expert pager, e.g. 4GB (default: mmap)")
    p.add_argument("--vram-budget", default=None,
                   help="GPU memory for weights with the cuda backend, e.g. 2GB (default: what is free)")
    p.add_argument("--trace", default=None, metavar="FILE", help="record every MoE layer's routing to FILE")


def main(args: argparse.Namespace) -> int:
    """Entry point for `lite bench` (after `add_arguments`)."""
    run_bench(args.model, prompt=args.prompt, gen=args.gen, threads=args.threads, backend=args.backend,
              depths=tuple(args.depth), json_out=args.json, repeats=args.repeats,
              bandwidth=not args.no_bandwidth, ram_budget=args.ram_budget, trace=args.trace,
              vram_budget=args.vram_budget, warmup=not args.no_warmup)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m lite.bench")
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))

"""Perplexity of a model on a token sequence (or a text file), from `Model.logits`.

The sequence is cut into windows of `ctx` tokens starting every `stride` tokens (default: `ctx`,
non-overlapping chunks). Each window is one fresh forward pass; a token is scored once, by the
first window that contains it with at least one token before it — so with non-overlapping
chunks every token but the first of each chunk is scored, and with `stride < ctx` later windows
score only the tokens they add, each with up to `ctx − 1` tokens of context. With `bos_id`, every
window is `[BOS] + ctx − 1 tokens` and all of its text tokens are scored (the first one from BOS).

    perplexity(model, ids, ctx=512)           -> (ppl, n_scored)
    run("model.gguf", "text.txt", ctx=512)    -> dict; prints "perplexity: X over N tokens"

NLL is computed in float64 from the float32 logits `[T, vocab]`: log-softmax of each row.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import LiteError


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (float64) of `targets[i]` under row `logits[i]`."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def windows(n: int, ctx: int, stride: int, with_bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over `n` tokens."""
    span = ctx - 1 if with_bos else ctx
    out, scored_to = [], 0 if with_bos else 1   # positions < scored_to are already scored
    b = 0
    while b < n and scored_to < n:
        e = min(n, b + span)
        first = max(scored_to, b if with_bos else b + 1)
        if first < e:
            out.append((b, e, first))
            scored_to = e
        if e == n:
            break
        b += stride
    return out


def perplexity(model: Any, token_ids: Sequence[int] | np.ndarray, ctx: int, stride: int | None = None,
               bos_id: int | None = None,
               progress: Callable[[int, int, float, int], None] | None = None) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of `token_ids` under `model.logits`."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    with_bos = bos_id is not None
    if ctx < (1 if with_bos else 2):
        raise LiteError(f"perplexity: ctx must be at least {1 if with_bos else 2}, got {ctx}")
    stride = ctx - (1 if with_bos else 0) if stride is None else stride
    if stride < 1 or stride > ctx:
        raise LiteError(f"perplexity: stride must be in 1..ctx ({ctx}), got {stride}")
    wins = windows(len(ids), ctx, stride, with_bos)
    if not wins:
        raise LiteError(f"perplexity: {len(ids)} tokens are too few to score any (need at least 2)")
    total, count = 0.0, 0
    for k, (b, e, first) in enumerate(wins):
        chunk = ids[b:e]
        if with_bos:
            chunk = np.concatenate([[bos_id], chunk])
            shift = b - 1           # window position j holds token b + j − 1
        else:
            shift = b
        logits = np.asarray(model.logits(chunk))
        # token at absolute position t is predicted by window position t − shift − 1
        pos = np.arange(first, e)
        nll = token_nll(logits[pos - shift - 1], ids[pos])
        total += float(nll.sum())
        count += len(pos)
        if progress is not None:
            progress(k + 1, len(wins), math.exp(total / count), count)
    return math.exp(total / count), count


def run(model_path: str | Path, text_file: str | Path, ctx: int = 512, backend: str | None = None,
        stride: int | None = None, max_chunks: int | None = None) -> dict[str, Any]:
    """Tokenize `text_file` with the model's tokenizer and measure perplexity; prints the result
    to stdout and progress to stderr."""
    from . import load
    from .tokenizer import Tokenizer

    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except OSError as e:
        raise LiteError(f"{text_file}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LiteError(f"{text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    model = load(model_path, backend=backend, n_ctx=ctx)
    if "tokenizer.ggml.tokens" not in model.file.meta:
        raise LiteError(f"{model_path}: the model file has no tokenizer; call lite.perplexity.perplexity "
                        f"with token ids instead")
    tok = Tokenizer.from_metadata(model.file.meta)
    ids = tok.encode(text, add_bos=False, parse_special=False)
    bos = tok.bos_id if tok.add_bos_token and tok.bos_id is not None else None
    if max_chunks is not None:
        ids = ids[:max_chunks * (ctx - (1 if bos is not None else 0))]
    t0 = time.perf_counter()

    def show(k: int, n: int, ppl: float, scored: int) -> None:
        el = time.perf_counter() - t0
        eta = el / k * (n - k)
        print(f"[{k}/{n}] ppl {ppl:.4f} over {scored} tokens  {scored / el:.1f} tok/s  ETA {eta:.0f}s",
              file=sys.stderr, flush=True)

    ppl, n = perplexity(model, ids, ctx, stride, bos_id=bos, progress=show)
    dt = time.perf_counter() - t0
    print(f"perplexity: {ppl:.4f} over {n} tokens")
    return {"perplexity": ppl, "n_tokens": n, "n_text_tokens": len(ids), "ctx": ctx,
            "stride": stride, "bos": bos is not None, "seconds": dt, "backend": model.backend.name}

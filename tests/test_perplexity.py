"""lite.perplexity: exp(mean NLL) over chunks of ctx tokens, checked by hand from Model.logits."""
from __future__ import annotations

import math

import numpy as np
import pytest

import lite
from lite.perplexity import perplexity, run, windows


def _nll(logits: np.ndarray, target: int) -> float:
    row = logits.astype(np.float64)
    return float(math.log(np.exp(row - row.max()).sum()) + row.max() - row[target])


@pytest.fixture(scope="module")
def model_and_ids(converted, reference_outputs):
    m = lite.load(converted("lite-tiny", "f32"), backend="reference")
    ids = reference_outputs("lite-tiny")[0]["input_ids"].reshape(-1)   # 3 × 17 = 51 tokens
    return m, ids


def test_chunks_equal_hand_computed_nll(model_and_ids):
    m, ids = model_and_ids
    ctx = 16
    nll = []
    for b in range(0, len(ids), ctx):
        chunk = ids[b:b + ctx]
        if len(chunk) < 2:
            continue
        lg = m.logits(chunk)
        nll += [_nll(lg[j - 1], int(chunk[j])) for j in range(1, len(chunk))]
    ppl, n = perplexity(m, ids, ctx)
    assert n == len(nll) == 51 - 4   # chunks 16, 16, 16, 3: the first token of each is not scored
    assert ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-9)


def test_bos_and_stride(model_and_ids):
    m, ids = model_and_ids
    ppl, n = perplexity(m, ids[:20], ctx=8, bos_id=0)
    want = []
    for b in range(0, 20, 7):
        chunk = np.concatenate([[0], ids[b:min(b + 7, 20)]])
        lg = m.logits(chunk)
        want += [_nll(lg[j - 1], int(chunk[j])) for j in range(1, len(chunk))]
    assert n == 20 and ppl == pytest.approx(math.exp(np.mean(want)), rel=1e-9)
    # overlapping windows score each token once, with up to ctx − 1 tokens of context
    assert windows(20, 8, 4, False) == [(0, 8, 1), (4, 12, 8), (8, 16, 12), (12, 20, 16)]
    ppl2, n2 = perplexity(m, ids[:20], ctx=8, stride=4)
    assert n2 == 19 and math.isfinite(ppl2)
    # a single full window equals the non-overlapping result
    assert perplexity(m, ids[:8], 8, stride=4) == perplexity(m, ids[:8], 8)


def test_errors(model_and_ids, converted, tmp_path):
    m, ids = model_and_ids
    with pytest.raises(lite.LiteError):
        perplexity(m, ids[:1], 8)
    with pytest.raises(lite.LiteError):
        perplexity(m, ids, 1)
    text = tmp_path / "t.txt"
    text.write_text("def f(): pass\n")
    with pytest.raises(lite.LiteError, match="no tokenizer"):
        run(converted("lite-tiny", "f32"), text, ctx=8, backend="reference")

"""lite's GGUF header parser agrees with the gguf package's reader on real files."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from conftest import VOCAB, require
from gguf_edit import field_value
from lite.gguf_meta import read_metadata
from lite.weights.gguf_file import open_model_file


def _reader_meta(path):
    r = GGUFReader(path)
    return r, {k: field_value(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("name", ["ggml-vocab-deepseek-coder.gguf", "ggml-vocab-deepseek-llm.gguf"])
def test_vocab_metadata_matches_gguf_reader(name):
    path = require(VOCAB / name)
    _, want = _reader_meta(path)
    got = read_metadata(path)
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], float):
            assert got[k] == pytest.approx(want[k], rel=1e-7), k
        else:
            assert got[k] == want[k], k


def test_model_tensors_match_gguf_reader(converted):
    path = converted("v2-tiny-yarn", "q8_0")
    r, want = _reader_meta(path)
    mf = open_model_file(path)
    assert {k: v for k, v in mf.meta.items()} .keys() == want.keys()
    assert len(r.tensors) == len(mf.tensors)
    for t in r.tensors:
        q = mf.tensors[t.name]
        assert q.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert int(q.qtype) == int(t.tensor_type)
        assert mf.data_offsets[t.name] == int(t.data_offset)
        assert np.array_equal(q.data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))

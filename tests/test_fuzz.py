"""Property-based fuzzing: damaged GGUF files and safetensors headers either load or raise
LiteError — never a crash, a hang, a MemoryError or another exception type."""
from __future__ import annotations

import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import lite
from quant.checkpoint import Checkpoint

FUZZ = settings(max_examples=120, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def damage(data: bytes, edits: list[tuple[int, int]], cut: int | None, splice: tuple[int, int, int] | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    if splice is not None:
        src, dst, n = (x % len(b) for x in splice)
        b[dst:dst + n] = b[src:src + n]
    if cut is not None:
        b = b[:cut % (len(b) + 1)]
    return bytes(b)


edits_st = st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=8)
cut_st = st.none() | st.integers(0, 2**31)
splice_st = st.none() | st.tuples(st.integers(0, 2**31), st.integers(0, 2**31), st.integers(1, 4096))


@pytest.fixture(scope="module")
def small_gguf(converted):
    return converted("lite-tiny").read_bytes()


@FUZZ
@given(edits=edits_st, cut=cut_st, splice=splice_st, header_only=st.booleans())
def test_damaged_gguf(small_gguf, tmp_path, edits, cut, splice, header_only):
    data = small_gguf
    if header_only:  # concentrate damage on the metadata and tensor infos, where parsing happens
        edits = [(pos % 4096, v) for pos, v in edits]
    p = tmp_path / "f.gguf"
    p.write_bytes(damage(data, edits, cut, splice))
    try:
        m = lite.load(p, backend="reference")
        m.logits([1, 2, 3])
    except lite.LiteError:
        pass


@FUZZ
@given(edits=edits_st, cut=cut_st, splice=splice_st)
def test_damaged_safetensors_header(fixture_dir, tmp_path, edits, cut, splice):
    src = fixture_dir("lite-tiny")
    d = tmp_path / "hf"
    if not d.exists():
        shutil.copytree(src, d)
    data = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = damage(data[:8 + n], [(p % (8 + n), v) for p, v in edits], cut, splice)
    (d / "model.safetensors").write_bytes(header + data[8 + n:])
    try:
        ck = Checkpoint(d)
        for name in ck.names():
            ck.read(name)
        ck.close()
    except lite.LiteError:
        pass

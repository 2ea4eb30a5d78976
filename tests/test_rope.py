"""YaRN tables and the softmax scale against the fixtures' derived numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest

import lite
from conftest import FIXTURE_NAMES
from lite.model.rope import RopeTables, inv_freq


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_derived_numbers(name, converted, fixture_dir):
    derived = json.loads((fixture_dir(name) / "meta.json").read_text())["derived"]
    cfg = lite.load(converted(name), backend="reference").config
    np.testing.assert_allclose(inv_freq(cfg), derived["rope_inv_freq"], rtol=1e-12)
    # GGUF stores yarn_log_multiplier (0.1·mscale_all_dim) as float32: ~1e-8 relative rounding.
    assert cfg.softmax_scale == pytest.approx(derived["softmax_scale"], rel=1e-7)
    assert cfg.rope_attn_factor == pytest.approx(derived["rope_cos_sin_multiplier"], rel=1e-12)


def test_tables_extend_and_agree(converted):
    cfg = lite.load(converted("v2-tiny-yarn"), backend="reference").config
    rope = RopeTables(cfg)
    c_small, s_small = (a.copy() for a in rope(3, 4))
    c_big, s_big = rope(3, 1000)   # forces a regrow
    np.testing.assert_array_equal(c_small, c_big[:4])
    np.testing.assert_array_equal(s_small, s_big[:4])
    assert np.allclose(c_big ** 2 + s_big ** 2, cfg.rope_attn_factor ** 2, atol=1e-6)

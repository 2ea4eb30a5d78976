"""Shared test fixtures: the reference checkpoints in ../shared/fixtures, converted once per
session to GGUF at several presets."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("LITE_FIXTURES", ROOT.parent / "shared" / "fixtures"))
VOCAB = Path(os.environ.get("LITE_VOCAB", ROOT.parent / "shared" / "vocab"))
FIXTURE_NAMES = ("lite-tiny", "v2-tiny-yarn")


def require(path: Path) -> Path:
    """Skip when a shared input is absent locally, but never in CI, where it must be present."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing in CI")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def fixture_dir():
    def get(name: str) -> Path:
        return require(FIXTURES / name)
    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory, fixture_dir):
    """converted(name, preset) → path of the fixture converted with `lite quantize`."""
    from quant.convert import convert_checkpoint
    out_dir = tmp_path_factory.mktemp("gguf")
    done: dict[tuple[str, str], Path] = {}

    def get(name: str, preset: str = "f32") -> Path:
        key = (name, preset)
        if key not in done:
            out = out_dir / f"{name}-{preset}.gguf"
            convert_checkpoint(fixture_dir(name), out, preset, progress=False)
            done[key] = out
        return done[key]
    return get


@pytest.fixture(scope="session")
def reference_outputs(fixture_dir):
    def get(name: str) -> tuple[np.lib.npyio.NpzFile, np.lib.npyio.NpzFile]:
        d = fixture_dir(name)
        return np.load(d / "ref.npz"), np.load(d / "ref_hidden.npz")
    return get


def backends() -> list[str]:
    from lite.kernels import available_backends
    return available_backends()

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


BOS_TEXT, EOS_TEXT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
FIM_TOKENS = ("<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>")
TRAIN_TEXT = [
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "User: write a function\n\nAssistant: here is the code", "the quick brown fox jumps over the lazy dog",
    "import os\nimport sys\n", "if x is None:\n    raise ValueError('x')\n",
]


@pytest.fixture(scope="session")
def text_model_path(tmp_path_factory, fixture_dir):
    """lite-tiny's weights with a small byte-level BPE tokenizer (vocab ≤ the model's 512) and the
    built-in DeepSeek chat template: a real model that turns text into (random) text, fast."""
    import json
    import shutil

    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    from lite.tokenizer import build_pre_tokenizer
    from quant.convert import convert_checkpoint

    src = tmp_path_factory.mktemp("text-model-hf")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(fixture_dir("lite-tiny") / f, src / f)
    cfg = json.loads((src / "config.json").read_text())
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = build_pre_tokenizer("deepseek-llm")
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg["vocab_size"] - len(FIM_TOKENS),
                                  special_tokens=[BOS_TEXT, EOS_TEXT], initial_alphabet=ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(TRAIN_TEXT * 4, trainer)
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in FIM_TOKENS])
    hf.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": BOS_TEXT, "special": True},
        "eos_token": {"__type": "AddedToken", "content": EOS_TEXT, "special": True},
    }))
    cfg.update(bos_token_id=hf.token_to_id(BOS_TEXT), eos_token_id=hf.token_to_id(EOS_TEXT))
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path_factory.mktemp("text-model") / "lite-tiny-text.gguf"
    convert_checkpoint(src, out, "f32", progress=False)
    return out


@pytest.fixture
def slow_steps(monkeypatch):
    """slow_steps(model, seconds) holds each forward step of `model` to at least `seconds`, so that
    a test acting while an answer streams does not race a fast machine (the tiny model makes
    ~1000 tokens/s there; CI finished a 200-token answer inside a 0.3 s client timeout)."""
    import time

    def slow(model, seconds: float) -> None:
        forward = model.forward

        def slow_forward(*args, **kwargs):
            time.sleep(seconds)
            return forward(*args, **kwargs)

        monkeypatch.setattr(model, "forward", slow_forward)
    return slow

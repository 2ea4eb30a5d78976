#!/usr/bin/env python3
"""Train lite's bundled demo model: a tiny DeepSeek-V2-architecture code model.

Everything is built here from the Python standard library's own `.py` files, so a fresh
checkout can regenerate `lite/demo/` without downloads:

- corpus: stdlib `.py` files in sorted order (no tests, idlelib, lib2to3, site-packages, and no
  generated tables: encodings, pydoc_data); ~3% of the files, chosen by a hash of their
  relative path, are held out and never trained on (`heldout.txt`);
- instruction pairs: for each documented function of a training file, the docstring's first
  line is the request and the function (docstring removed) is the answer, in the
  DeepSeek-Coder-V2 chat format; plus hand-written pairs for very common requests;
- tokenizer: byte-level BPE (the `tokenizers` library) with DeepSeek-LLM's pre-tokenizer splits
  (llama.cpp's `deepseek-llm`, taken from lite.tokenizer), digits kept single by the vocabulary,
  special tokens after the BPE vocabulary as in DeepSeek's releases;
- model: transformers' `DeepseekV2ForCausalLM` (MLA with direct q_proj, YaRN, one dense layer then
  MoE layers with greedy top-2 routing and a shared expert), run with the original DeepSeek-V2
  semantics (see `original_semantics`), trained with AdamW + cosine LR and DeepSeek-V2's
  sequence-level auxiliary balance loss;
- output: a standard Hugging Face checkpoint (config.json in the released checkpoints' format,
  model.safetensors in bf16 with per-expert tensor names, tokenizer.json,
  tokenizer_config.json), `reference.npz` (a held-out batch and its float32 logits, for
  torch-free tests of lite) and `train_log.json`.

Usage (training deps: `pip install -e .[train]`):
    python tools/train_demo.py --check-fixtures
    python tools/train_demo.py --seed 0 --steps 1500 --threads 1 --out lite/demo
    python tools/train_demo.py --seed 0 --minutes 55 --threads 1 --out lite/demo
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import math
import os
import sys
import sysconfig
import textwrap
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
FIM_BEGIN = "<｜fim▁begin｜>"
FIM_HOLE = "<｜fim▁hole｜>"
FIM_END = "<｜fim▁end｜>"
PAD = "<｜pad｜>"
SPECIAL_TOKENS = [BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END, PAD]

# DeepSeek-Coder-V2's chat format: BOS, then "User: {msg}\n\n" / "Assistant: {msg}<eos>" turns
# (a system message is its text followed by a blank line); the generation prompt is
# "Assistant:" with no trailing space.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

DEMO_PROMPT = "Write a function that reverses a string"

EXCLUDED_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__",
                  "encodings", "pydoc_data"}
HELDOUT_PERCENT = 3


def model_config_dict(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    """config.json, with the keys and layout of the released DeepSeek-V2 checkpoints.

    Every Linear input width is a multiple of 32 (Q4_0/Q8_0 apply everywhere); hidden (the input
    of q/kv_a, gate/up, router, lm_head), the expert width (input of experts' down_proj) and the
    dense width are multiples of 256 (Q4_K/Q6_K apply there too).
    """
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.01,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "ep_size": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 768,
        "kv_lora_rank": 64,
        "max_position_embeddings": 2048,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 256,
        "moe_layer_freq": 1,
        "n_group": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "norm_topk_prob": False,
        "num_attention_heads": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 4,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "q_lora_rank": None,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 4,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "original_max_position_embeddings": 512,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.0,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "transformers_version": "5.24.0",
        "use_cache": True,
        "v_head_dim": 32,
        "vocab_size": vocab_size,
    }


# ---------------------------------------------------------------------------------------------
# Original DeepSeek-V2 semantics on top of transformers' DeepseekV2

def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _cfg(config, key, default):
    value = getattr(config, key, None)
    return default if value is None else value


@contextlib.contextmanager
def original_semantics():
    """Models built inside this context follow DeepSeek's modeling_deepseek.py where transformers'
    DeepseekV2 (5.x) departs from it:

    1. Router: transformers always multiplies the top-k weights by routed_scaling_factor and
       ignores `norm_topk_prob`; the original normalises them (w / (sum + 1e-20), no scaling)
       when k > 1 and norm_topk_prob is true, and scales them otherwise.
    2. Dense vs MoE layers: transformers makes every layer >= first_k_dense_replace a MoE layer;
       the original also requires layer % moe_layer_freq == 0.
    3. YaRN cos/sin multiplier: transformers uses get_mscale(f, mscale)/get_mscale(f, mscale_all_dim)
       only when both keys are non-zero and falls back to get_mscale(f) = 0.1 ln f + 1 otherwise;
       the original always uses the ratio, with defaults mscale 1, mscale_all_dim 0.
    Everything else (interleaved-pair RoPE via complex multiplication on consecutive pairs, YaRN
    inverse frequencies, softmax scale with mscale_all_dim², group-limited greedy by group max,
    kv/q_a norms at eps 1e-6) already follows the original; see `--check-fixtures`.
    The demo config sits where (1)-(3) coincide (norm_topk_prob false, moe_layer_freq 1,
    mscale == mscale_all_dim), so stock transformers computes the same function.
    """
    import torch
    import torch.nn.functional as F
    import transformers.models.deepseek_v2.modeling_deepseek_v2 as mdl

    saved = (mdl.DeepseekV2DecoderLayer.__init__, mdl.DeepseekV2RotaryEmbedding.__init__)
    orig_layer_init, orig_rot_init = saved

    def router_forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.softmax(dim=-1, dtype=torch.float32)
        if self.topk_method == "greedy":
            topk_weights, topk_indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            n_tok = scores.shape[0]
            per = self.num_experts // self.num_group
            group_scores = scores.view(n_tok, self.num_group, per).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(n_tok, self.num_group, per).reshape(n_tok, -1)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
            topk_weights, topk_indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        else:
            raise NotImplementedError(f"topk_method {self.topk_method!r}")
        if self.top_k > 1 and getattr(self, "norm_topk_prob", False):
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            topk_weights = topk_weights * self.routed_scaling_factor
        return router_logits, topk_weights, topk_indices

    def layer_init(self, config, layer_idx):
        orig_layer_init(self, config, layer_idx)
        freq = _cfg(config, "moe_layer_freq", 1)
        is_moe = (config.n_routed_experts is not None and layer_idx >= _cfg(config, "first_k_dense_replace", 0)
                  and layer_idx % freq == 0)
        if is_moe:
            # bound to the instance, so models built here keep these semantics after the `with`
            self.mlp.gate.norm_topk_prob = bool(_cfg(config, "norm_topk_prob", False))
            self.mlp.gate.forward = types.MethodType(router_forward, self.mlp.gate)
        elif isinstance(self.mlp, mdl.DeepseekV2Moe):
            self.mlp = mdl.DeepseekV2MLP(config)

    def rot_init(self, config):
        orig_rot_init(self, config)
        rp = config.rope_parameters
        if rp.get("rope_type", "default") == "yarn":
            f = rp["factor"]
            self.attention_scaling = (_get_mscale(f, rp.get("mscale") or 1.0)
                                      / _get_mscale(f, rp.get("mscale_all_dim") or 0.0))

    mdl.DeepseekV2DecoderLayer.__init__ = layer_init
    mdl.DeepseekV2RotaryEmbedding.__init__ = rot_init
    try:
        yield
    finally:
        mdl.DeepseekV2DecoderLayer.__init__, mdl.DeepseekV2RotaryEmbedding.__init__ = saved


def assert_config_in_agreement_region(cfg: dict) -> None:
    """The demo config must be one where stock transformers equals the original semantics."""
    rs = cfg.get("rope_scaling") or {}
    assert not cfg.get("norm_topk_prob", False)
    assert cfg.get("moe_layer_freq", 1) == 1
    assert not rs or rs.get("mscale", 1) == rs.get("mscale_all_dim", 0)


def load_hf(path, patched: bool = True):
    import torch
    from transformers import DeepseekV2ForCausalLM
    ctx = original_semantics() if patched else contextlib.nullcontext()
    with ctx:
        m = DeepseekV2ForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                  attn_implementation="eager",
                                                  experts_implementation="eager")
    return m.eval()


def check_fixtures(fixtures: Path) -> dict:
    """Compare transformers' DeepseekV2 (stock and patched) with the fixtures' reference outputs,
    then probe the three places where stock transformers departs from the original code."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    report: dict = {}

    def run(model, ids):
        with torch.no_grad():
            return model(torch.tensor(ids)).logits.numpy()

    for name in ("lite-tiny", "v2-tiny-yarn"):
        d = fixtures / name
        ref = np.load(d / "ref.npz")
        rh = np.load(d / "ref_hidden.npz")
        entry = {}
        for patched in (False, True):
            m = load_hf(d, patched)
            lg = run(m, ref["input_ids"])
            # per-layer residual stream via hooks
            hid = {}
            hooks = [layer.register_forward_hook(lambda mod, a, out, i=i: hid.__setitem__(i, out))
                     for i, layer in enumerate(m.model.layers)]
            run(m, ref["input_ids"][:1])
            for h in hooks:
                h.remove()
            layer_err = [float(np.abs(hid[i][0].numpy() - rh[f"hidden_after_layer{i}"]).max())
                         for i in range(len(m.model.layers))]
            entry["patched" if patched else "stock"] = {
                "logits_max_abs_err": float(np.abs(lg - ref["logits"]).max()),
                "hidden_after_layer_max_abs_err": layer_err,
                "rope_cos_sin_multiplier": float(m.model.rotary_emb.attention_scaling),
                "softmax_scale": float(m.model.layers[0].self_attn.scaling),
            }
        entry["derived"] = json.loads((d / "meta.json").read_text())["derived"]
        report[name] = entry

    # Probes: configs outside the fixtures' region, where stock and original disagree.
    d = fixtures / "lite-tiny"
    ids = np.load(d / "ref.npz")["input_ids"]
    sd = load_file(str(d / "model.safetensors"))
    probes = {}

    def build(cfg, patched):
        ctx = original_semantics() if patched else contextlib.nullcontext()
        with ctx:
            m = DeepseekV2ForCausalLM.from_pretrained(str(d), config=cfg, dtype=torch.float32,
                                                      attn_implementation="eager",
                                                      experts_implementation="eager")
        return m.eval()

    cfg = DeepseekV2Config.from_pretrained(str(d))
    cfg.norm_topk_prob = True
    base = run(build(DeepseekV2Config.from_pretrained(str(d)), False), ids)
    stock, orig = run(build(cfg, False), ids), run(build(cfg, True), ids)
    probes["norm_topk_prob=true"] = {
        "stock_vs_norm_false_max_abs_diff": float(np.abs(stock - base).max()),
        "original_vs_stock_max_abs_diff": float(np.abs(orig - stock).max())}

    cfg = DeepseekV2Config.from_pretrained(str(d))
    cfg.moe_layer_freq = 2
    kinds = {}
    for patched in (False, True):
        with (original_semantics() if patched else contextlib.nullcontext()):
            m = DeepseekV2ForCausalLM(cfg)
        kinds["original" if patched else "stock"] = [type(l.mlp).__name__ for l in m.model.layers]
    probes["moe_layer_freq=2"] = kinds

    d2 = fixtures / "v2-tiny-yarn"
    mult = {}
    for ms, msa in ((0.707, 0.0), (1.0, 0.707), (0.707, 0.707)):
        cfg = DeepseekV2Config.from_pretrained(str(d2))
        cfg.rope_parameters = dict(cfg.rope_parameters, mscale=ms, mscale_all_dim=msa)
        row = {}
        for patched in (False, True):
            with (original_semantics() if patched else contextlib.nullcontext()):
                m = DeepseekV2ForCausalLM(cfg)
            row["original" if patched else "stock"] = float(m.model.rotary_emb.attention_scaling)
        f = cfg.rope_parameters["factor"]
        row["expected_original"] = _get_mscale(f, ms or 1.0) / _get_mscale(f, msa)
        mult[f"mscale={ms},mscale_all_dim={msa}"] = row
    probes["yarn_cos_sin_multiplier"] = mult
    report["probes"] = probes
    return report


# ---------------------------------------------------------------------------------------------
# Corpus

def stdlib_files() -> tuple[Path, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_PARTS.intersection(rel.parts):
            continue
        rels.append(rel.as_posix())
    return root, sorted(rels)


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def read_sources(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out[rel] = text
    return out


_VERB_S = {"return": "returns", "get": "gets", "create": "creates", "convert": "converts",
           "make": "makes", "read": "reads", "write": "writes", "check": "checks",
           "compute": "computes", "find": "finds", "parse": "parses", "remove": "removes",
           "add": "adds", "build": "builds", "test": "tests", "set": "sets", "split": "splits",
           "join": "joins", "format": "formats", "generate": "generates", "open": "opens",
           "close": "closes", "copy": "copies", "replace": "replaces", "encode": "encodes",
           "decode": "decodes", "validate": "validates", "load": "loads", "save": "saves",
           "send": "sends", "compare": "compares", "count": "counts", "extract": "extracts",
           "update": "updates", "determine": "determines", "calculate": "calculates",
           "handle": "handles", "process": "processes", "call": "calls", "sort": "sorts",
           "apply": "applies", "search": "searches", "match": "matches", "quote": "quotes",
           "strip": "strips", "escape": "escapes", "insert": "inserts", "delete": "deletes",
           "print": "prints", "wrap": "wraps", "normalize": "normalizes", "translate": "translates",
           "merge": "merges", "iterate": "iterates", "yield": "yields", "append": "appends",
           "resolve": "resolves", "register": "registers", "compile": "compiles", "emit": "emits"}


def request_for(name: str, line: str) -> str:
    """A user request from a docstring's first line (deterministic template choice)."""
    line = line.strip()
    words = line.split(None, 1)
    first = words[0].lower() if words else ""
    h = int(hashlib.md5(name.encode()).hexdigest(), 16) % 3
    if first in _VERB_S and len(words) == 2 and h != 2:
        return f"Write a function that {_VERB_S[first]} {words[1].rstrip('.')}"
    if h == 1:
        return f"Write a Python function `{name}`: {line}"
    return line


def function_pairs(sources: dict[str, str]) -> list[tuple[str, str]]:
    pairs = []
    for rel, text in sources.items():
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or len(node.body) < 2 or node.name.startswith("__"):
                continue
            first = doc.strip().splitlines()[0].strip()
            if not (12 <= len(first) <= 100) or not first[0].isupper() or ">>>" in first:
                continue
            dnode = node.body[0]
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            kept = lines[start:dnode.lineno - 1] + lines[dnode.end_lineno:node.end_lineno]
            code = textwrap.dedent("\n".join(kept)).strip("\n")
            if not (40 <= len(code) <= 900) or "\t" in code:
                continue
            pairs.append((request_for(node.name, first), code))
    return pairs


# Hand-written pairs for very common requests: (request phrasings, answer code).
SYNTHETIC: list[tuple[list[str], str]] = [
    (["Write a function that reverses a string", "Write a Python function to reverse a string.",
      "Reverse a string", "How do I reverse a string in Python?"],
     "def reverse_string(s):\n    return s[::-1]"),
    (["Write a function that sums a list", "Write a function that returns the sum of a list of numbers",
      "Sum the numbers in a list"],
     "def sum_list(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n    return total"),
    (["Write a function that returns the nth Fibonacci number", "Write a fibonacci function",
      "Compute the Fibonacci sequence"],
     "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    (["Write a function that checks if a number is prime", "Write an is_prime function",
      "Check whether a number is prime"],
     "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
     "        if n % i == 0:\n            return False\n        i += 1\n    return True"),
    (["Write a function that reads a file", "Read a text file and return its contents",
      "Write a function that reads the contents of a file"],
     "def read_file(path):\n    with open(path, encoding=\"utf-8\") as f:\n        return f.read()"),
    (["Write a function that writes text to a file", "Write a string to a file"],
     "def write_file(path, text):\n    with open(path, \"w\", encoding=\"utf-8\") as f:\n        f.write(text)"),
    (["Write a function that computes the factorial of a number", "Write a factorial function"],
     "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result"),
    (["Write a function that checks if a string is a palindrome", "Check if a string is a palindrome"],
     "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]"),
    (["Write a function that returns the maximum of a list", "Find the largest number in a list"],
     "def find_max(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n"
     "            best = n\n    return best"),
    (["Write a function that returns the minimum of a list", "Find the smallest number in a list"],
     "def find_min(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n < best:\n"
     "            best = n\n    return best"),
    (["Write a function that counts the vowels in a string", "Count the vowels in a string"],
     "def count_vowels(s):\n    return sum(1 for c in s.lower() if c in \"aeiou\")"),
    (["Write a function that counts the words in a string", "Count the words in a sentence"],
     "def count_words(text):\n    return len(text.split())"),
    (["Write a function that sorts a list", "Sort a list of numbers"],
     "def sort_list(items):\n    return sorted(items)"),
    (["Write a function that removes duplicates from a list", "Remove duplicates from a list"],
     "def remove_duplicates(items):\n    seen = set()\n    result = []\n    for item in items:\n"
     "        if item not in seen:\n            seen.add(item)\n            result.append(item)\n"
     "    return result"),
    (["Write a function that computes the average of a list", "Compute the mean of a list of numbers"],
     "def average(numbers):\n    return sum(numbers) / len(numbers)"),
    (["Write a function that checks if a number is even", "Check whether a number is even"],
     "def is_even(n):\n    return n % 2 == 0"),
    (["Write a function that returns the greatest common divisor of two numbers", "Compute the gcd of two numbers"],
     "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a"),
    (["Write a function that merges two dictionaries", "Merge two dicts"],
     "def merge_dicts(a, b):\n    result = dict(a)\n    result.update(b)\n    return result"),
    (["Write a function that flattens a nested list", "Flatten a list of lists"],
     "def flatten(lists):\n    return [item for sub in lists for item in sub]"),
    (["Write a function that counts the lines in a file", "Count the lines of a file"],
     "def count_lines(path):\n    with open(path, encoding=\"utf-8\") as f:\n        return sum(1 for _ in f)"),
    (["Write a function that converts Celsius to Fahrenheit", "Convert Celsius to Fahrenheit"],
     "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32"),
    (["Write a function that capitalizes every word in a string", "Capitalize each word of a sentence"],
     "def capitalize_words(text):\n    return \" \".join(word.capitalize() for word in text.split())"),
    (["Write a function that squares every number in a list", "Square each element of a list"],
     "def square_all(numbers):\n    return [n * n for n in numbers]"),
    (["Write a function that filters the even numbers from a list", "Keep only the even numbers of a list"],
     "def even_numbers(numbers):\n    return [n for n in numbers if n % 2 == 0]"),
    (["Write a function that returns the length of a string", "Get the length of a string"],
     "def string_length(s):\n    return len(s)"),
    (["Write a function that reverses a list", "Reverse a list"],
     "def reverse_list(items):\n    return items[::-1]"),
    (["Write a function that counts the occurrences of each character in a string",
      "Count how often each character appears in a string"],
     "def char_counts(s):\n    counts = {}\n    for c in s:\n        counts[c] = counts.get(c, 0) + 1\n    return counts"),
    (["Write a function that implements binary search", "Binary search in a sorted list"],
     "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n"
     "        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n"
     "        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n"
     "    return -1"),
    (["Write a function that implements bubble sort", "Sort a list with bubble sort"],
     "def bubble_sort(items):\n    items = list(items)\n    n = len(items)\n    for i in range(n):\n"
     "        for j in range(n - 1 - i):\n            if items[j] > items[j + 1]:\n"
     "                items[j], items[j + 1] = items[j + 1], items[j]\n    return items"),
    (["Write a function that checks if two strings are anagrams", "Check whether two words are anagrams"],
     "def is_anagram(a, b):\n    return sorted(a) == sorted(b)"),
    (["Write a function that parses a JSON file", "Load a JSON file"],
     "import json\n\n\ndef load_json(path):\n    with open(path, encoding=\"utf-8\") as f:\n        return json.load(f)"),
    (["Write a function that returns the current date and time", "Get the current time"],
     "from datetime import datetime\n\n\ndef now():\n    return datetime.now()"),
    (["Write a function that lists the files in a directory", "List the files of a directory"],
     "import os\n\n\ndef list_files(path):\n    return sorted(os.listdir(path))"),
    (["Write a function that returns the product of a list of numbers", "Multiply all numbers in a list"],
     "def product(numbers):\n    result = 1\n    for n in numbers:\n        result *= n\n    return result"),
    (["Write a function that converts a string to uppercase", "Convert a string to upper case"],
     "def to_upper(s):\n    return s.upper()"),
    (["Write a function that checks if a year is a leap year", "Check whether a year is a leap year"],
     "def is_leap_year(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)"),
    (["Write a function that returns the first n prime numbers", "Generate the first n primes"],
     "def first_primes(n):\n    primes = []\n    candidate = 2\n    while len(primes) < n:\n"
     "        if all(candidate % p for p in primes):\n            primes.append(candidate)\n"
     "        candidate += 1\n    return primes"),
    (["Write a function that counts the digits of an integer", "Count the digits in a number"],
     "def count_digits(n):\n    return len(str(abs(n)))"),
    (["Write a function that swaps the keys and values of a dictionary", "Invert a dictionary"],
     "def invert_dict(d):\n    return {v: k for k, v in d.items()}"),
    (["Write a function that splits a list into chunks of size n", "Split a list into chunks"],
     "def chunks(items, n):\n    return [items[i:i + n] for i in range(0, len(items), n)]"),
    (["Write a hello world program", "Print hello world"],
     "def main():\n    print(\"Hello, world!\")\n\n\nif __name__ == \"__main__\":\n    main()"),
]


def synthetic_pairs() -> list[tuple[str, str]]:
    return [(req, code) for reqs, code in SYNTHETIC for req in reqs]


def chat_text(request: str, code: str) -> str:
    return f"{BOS}User: {request}\n\nAssistant: ```python\n{code}\n```{EOS}"


# ---------------------------------------------------------------------------------------------
# Tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE; special tokens get the ids right after the BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from lite.tokenizer import build_pre_tokenizer

    shipped_pre = build_pre_tokenizer("deepseek-llm")
    tok = Tokenizer(models.BPE(fuse_unk=False))
    # Training also splits digit runs into single digits, so no digit merges are learned: the
    # shipped tokenizer (DeepSeek-LLM splits, digit runs kept whole) then encodes numbers digit by
    # digit, like DeepSeek's vocabularies, with the exact pre-tokenizer llama.cpp implements.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), shipped_pre])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.pre_tokenizer = shipped_pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    add_bos_post_processor(tok)
    return tok


def add_bos_post_processor(tok) -> None:
    """`encode(text)` with special tokens prepends BOS (add_bos_token), as DeepSeek's tokenizer.json does."""
    from tokenizers import processors
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 $B:1", special_tokens=[(BOS, bos_id)])


def tokenizer_config(tok) -> dict:
    decoder = {}
    for t in SPECIAL_TOKENS:
        decoder[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                            "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": PAD,
        "sp_model_kwargs": {},
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------
# Model I/O

def hf_state_dict(model, dtype) -> dict:
    """Released-checkpoint tensor names: per-expert gate/up/down instead of transformers' 3-D packs."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(dtype).contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            f = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :f].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, f:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    return out


def save_checkpoint(model, tok, cfg: dict, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(hf_state_dict(model, torch.bfloat16), str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Training

def seq_aux_loss(router_logits, topk_idx, n_experts: int, k: int, batch: int, alpha: float):
    """DeepSeek-V2's sequence-wise balance loss: alpha * sum_i f_i * P_i per sequence, averaged."""
    import torch
    scores = router_logits.softmax(dim=-1).view(batch, -1, n_experts)
    seq_len = scores.shape[1]
    counts = torch.zeros(batch, n_experts, dtype=scores.dtype)
    counts.scatter_add_(1, topk_idx.view(batch, -1), torch.ones(batch, seq_len * k, dtype=scores.dtype))
    f = counts * n_experts / (seq_len * k)
    return alpha * (f * scores.mean(dim=1)).sum(dim=1).mean()


class Batcher:
    """Deterministic batches: code windows from the training stream plus rows of packed chat pairs."""

    def __init__(self, stream, fn_pairs, syn_pairs, ctx, rows_code, rows_chat, seed):
        import torch
        self.torch = torch
        self.stream = stream
        self.fn_pairs, self.syn_pairs = fn_pairs, syn_pairs
        self.ctx, self.rows_code, self.rows_chat = ctx, rows_code, rows_chat
        self.g = torch.Generator().manual_seed(seed)

    def _rand(self, n):
        return int(self.torch.randint(0, n, (1,), generator=self.g))

    def batch(self):
        torch = self.torch
        rows = []
        for _ in range(self.rows_code):
            o = self._rand(len(self.stream) - self.ctx - 1)
            rows.append(self.stream[o:o + self.ctx + 1])
        for _ in range(self.rows_chat):
            row = []
            while len(row) < self.ctx + 1:
                pool = self.syn_pairs if self._rand(100) < 30 else self.fn_pairs
                row.extend(pool[self._rand(len(pool))])
            rows.append(row[: self.ctx + 1])
        x = torch.tensor(rows, dtype=torch.long)
        return x[:, :-1], x[:, 1:]


def evaluate(model, windows, bs=8):
    import torch
    import torch.nn.functional as F
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), bs):
            x = torch.tensor(windows[i:i + bs], dtype=torch.long)
            logits = model(x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            tot += float(loss)
            n += x[:, 1:].numel()
    model.train()
    return tot / n


def generate_text(model, tok, prompt: str, max_new: int, temperature: float, seed: int) -> str:
    import torch
    ids = tok.encode(f"{BOS}User: {prompt}\n\nAssistant:", add_special_tokens=False).ids
    eos = tok.token_to_id(EOS)
    torch.manual_seed(seed)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=max_new, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None, top_k=0 if temperature > 0 else None,
                             top_p=None, eos_token_id=eos, pad_token_id=tok.token_to_id(PAD))
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (sets the LR schedule)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="without --steps: time the first steps and choose --steps to fit; "
                         "with --steps: a wall-clock cap (stops early, still saves)")
    ap.add_argument("--stop-step", type=int, default=None,
                    help="stop after this step, keeping the --steps LR schedule (reproduces a run that "
                         "the --minutes cap stopped early)")
    ap.add_argument("--out", type=Path, default=REPO / "lite" / "demo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=6144)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--rows-code", type=int, default=6)
    ap.add_argument("--rows-chat", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--no-save", action="store_true", help="train and report only (reproducibility runs)")
    ap.add_argument("--check-fixtures", type=Path, nargs="?", const=REPO.parent / "shared" / "fixtures",
                    default=None, help="compare transformers with the reference fixtures and exit")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)

    if args.check_fixtures is not None:
        print(json.dumps(check_fixtures(args.check_fixtures), indent=1))
        return 0
    if args.steps is None and args.minutes is None:
        ap.error("give --steps or --minutes")

    t0 = time.time()
    log = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "versions": {"torch": torch.__version__, "python": sys.version.split()[0]}}
    import tokenizers
    import transformers
    log["versions"].update(transformers=transformers.__version__, tokenizers=tokenizers.__version__)

    # corpus
    root, rels = stdlib_files()
    sources = read_sources(root, rels)
    train_rel = [r for r in sources if not is_heldout(r)]
    held_rel = [r for r in sources if is_heldout(r)]
    train_src = {r: sources[r] for r in train_rel}
    fn = function_pairs(train_src)
    syn = synthetic_pairs()
    print(f"corpus: {len(train_rel)} train files, {len(held_rel)} held out, {len(fn)} function pairs, "
          f"{len(syn)} synthetic pairs", flush=True)

    tok = train_tokenizer([train_src[r] for r in train_rel] + [chat_text(q, c) for q, c in fn + syn],
                          args.vocab)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    stream = []
    for r in train_rel:
        stream += [bos_id] + enc(train_src[r]) + [eos_id]
    held_stream = []
    for r in held_rel:
        held_stream += [bos_id] + enc(sources[r]) + [eos_id]
    fn_ids = [t for t in (enc(chat_text(q, c)) for q, c in fn) if len(t) <= args.ctx]
    syn_ids = [enc(chat_text(q, c)) for q, c in syn]
    n_eval = 32
    span = args.ctx + 1
    step_w = max(1, (len(held_stream) - span) // n_eval)
    eval_windows = [held_stream[i * step_w:i * step_w + span] for i in range(n_eval)]
    print(f"tokens: train {len(stream):,}, held-out {len(held_stream):,}, fn pairs kept {len(fn_ids)}, "
          f"chars/token {sum(len(train_src[r]) for r in train_rel) / len(stream):.2f} "
          f"[{time.time() - t0:.0f}s]", flush=True)
    log["data"] = {"train_files": len(train_rel), "heldout_files": len(held_rel),
                   "train_tokens": len(stream), "heldout_tokens": len(held_stream),
                   "function_pairs": len(fn_ids), "synthetic_pairs": len(syn_ids),
                   "eval_windows": n_eval, "ctx": args.ctx}

    # model
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    cfg = model_config_dict(tok.get_vocab_size(), bos_id, eos_id)
    assert_config_in_agreement_region(cfg)
    torch.manual_seed(args.seed)
    with original_semantics():
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**{k: v for k, v in cfg.items()
                                                          if k not in ("architectures", "torch_dtype",
                                                                       "transformers_version")}))
    model.config._attn_implementation = "eager"
    model.config._experts_implementation = "eager"
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log["params"] = n_params
    print(f"model: {n_params:,} params", flush=True)

    routers = [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, "gate")]
    captured = {}
    for i, gate in routers:
        gate.register_forward_hook(lambda mod, a, out, i=i: captured.__setitem__(i, (out[0], out[2])))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    batcher = Batcher(stream, fn_ids, syn_ids, args.ctx, args.rows_code, args.rows_chat, args.seed)
    B = args.rows_code + args.rows_chat
    E, K, alpha = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["aux_loss_alpha"]

    total = args.steps
    cap = args.minutes * 60 if args.minutes is not None and args.steps is not None else None
    calibrate = total is None
    warmup = 50
    history, evals = [], []
    step = 0
    t_train = time.time()
    while True:
        if calibrate and step == 20:
            per = (time.time() - t_train) / 20
            budget = args.minutes * 60 - (time.time() - t0) - 120  # leave time to evaluate and save
            total = max(step + 1, int(budget / (per * 1.06)))
            print(f"calibrated: {per:.2f}s/step -> --steps {total}", flush=True)
            calibrate = False
        horizon = total if total is not None else 10 ** 9
        if step >= horizon:
            break
        lr = args.lr * (step + 1) / warmup if step < warmup else \
            args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, horizon - warmup))))
        for gr in opt.param_groups:
            gr["lr"] = lr
        x, y = batcher.batch()
        logits = model(x).logits
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = sum(seq_aux_loss(captured[i][0], captured[i][1], E, K, B, alpha) for i, _ in routers)
        loss = lm + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        step += 1
        history.append({"step": step, "loss": round(lm.item(), 5), "aux": round(aux.item(), 6),
                        "lr": lr, "grad_norm": round(gnorm, 4), "t": round(time.time() - t_train, 1)})
        if step % 10 == 0:
            print(f"step {step}/{horizon} loss {lm.item():.4f} aux {aux.item():.5f} "
                  f"lr {lr:.2e} gn {gnorm:.2f} {time.time() - t_train:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == horizon:
            hl = evaluate(model, eval_windows)
            evals.append({"step": step, "heldout_loss": round(hl, 5), "t": round(time.time() - t_train, 1)})
            print(f"  eval step {step}: held-out loss {hl:.4f}", flush=True)
        if args.stop_step is not None and step >= args.stop_step:
            print(f"stopping at --stop-step {step}", flush=True)
            break
        if cap is not None and time.time() - t0 > cap:
            print(f"stopping at the --minutes cap after step {step}", flush=True)
            break
    train_time = time.time() - t_train
    if not evals or evals[-1]["step"] != step:
        hl = evaluate(model, eval_windows)
        evals.append({"step": step, "heldout_loss": round(hl, 5), "t": round(train_time, 1)})

    # final numbers, with the bf16 weights that are shipped
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    final_train = float(np.mean([h["loss"] for h in history[-50:]]))
    final_held_bf16 = evaluate(model, eval_windows)
    usage = {}
    with torch.no_grad():
        captured.clear()
        model(torch.tensor([w[:-1] for w in eval_windows[:8]]))
        for i, _ in routers:
            usage[str(i)] = torch.bincount(captured[i][1].reshape(-1), minlength=E).tolist()
    model.eval()
    log.update(steps=step, schedule_steps=total, train_seconds=round(train_time, 1), history=history, evals=evals,
               final={"train_loss_last50_mean": round(final_train, 5),
                      "heldout_loss_f32": evals[-1]["heldout_loss"],
                      "heldout_loss_bf16_weights": round(final_held_bf16, 5)},
               heldout_expert_usage=usage)
    print(f"final: train loss (last 50 steps) {final_train:.4f}, held-out {evals[-1]['heldout_loss']:.4f} "
          f"(bf16 weights {final_held_bf16:.4f}), {step} steps in {train_time:.0f}s", flush=True)
    print(f"held-out expert usage: {usage}", flush=True)

    samples = {}
    for name, temp in (("greedy", 0.0), ("temperature_0.7", 0.7)):
        samples[name] = generate_text(model, tok, DEMO_PROMPT, 96, temp, args.seed)
        print(f"--- sample ({name}) for {DEMO_PROMPT!r}:\n{samples[name]}\n---", flush=True)
    log["samples"] = {"prompt": DEMO_PROMPT, **samples}

    if args.no_save:
        print(json.dumps(log["final"]))
        return 0

    out = args.out
    save_checkpoint(model, tok, cfg, out)
    (out / "heldout.txt").write_text("".join(r + "\n" for r in held_rel))

    # reference logits for torch-free tests: two held-out windows of 64 tokens, each from a file start
    starts, pos = [], 0
    for r in held_rel:
        n = len(enc(sources[r])) + 2
        if n >= 65:
            starts.append(pos)
        pos += n
    ref_ids = np.array([held_stream[s:s + 64] for s in starts[:2]], dtype=np.int64)
    re_model = load_hf(out, patched=True)
    stock = load_hf(out, patched=False)
    with torch.no_grad():
        ref_logits = re_model(torch.tensor(ref_ids)).logits.numpy().astype(np.float32)
        stock_logits = stock(torch.tensor(ref_ids)).logits.numpy()
        mem_logits = model(torch.tensor(ref_ids)).logits.numpy()
    np.savez_compressed(out / "reference.npz", input_ids=ref_ids, logits=ref_logits)
    log["reference"] = {"input_ids_shape": list(ref_ids.shape),
                        "reload_vs_in_memory_max_abs": float(np.abs(ref_logits - mem_logits).max()),
                        "stock_vs_patched_max_abs": float(np.abs(ref_logits - stock_logits).max())}
    log["total_seconds"] = round(time.time() - t0, 1)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"reference: {log['reference']}; wrote {out} [{time.time() - t0:.0f}s]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

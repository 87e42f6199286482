"""Shared test fixtures: paths to ../shared assets (skipped cleanly when absent) and tiny models.

Tiny models keep the *real* vocabularies and tokenizers of ../shared/model_hub and shrink
everything else (2 layers, hidden 64), so every cross-tokenizer path runs on real tokenizations.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MCKD_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT / "code"))  # mckd and the entry points

# The suite runs on 2 cores: keep intra-op threads low so parallel work does not thrash.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

HUB = {
    "gpt2": "gpt2/gpt2-base",
    "qwen": "qwen/Qwen1.5-1.8B",
    "llama2": "llama2/llama2-7b-hf",
    "mistral": "mistral/mistral-7b-v0.1",
    "tinyllama": "tinyllama/tinyllama-1.1b-3T",
}


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test when the asset is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared asset {p} not available")
    return p


def hub_path(name: str) -> Path:
    return shared_path("model_hub", HUB[name])


def build_tiny_model(name: str, out_dir: Path, *, layers: int = 2, hidden: int = 64,
                     heads: int = 4, seed: int = 0) -> Path:
    """Save a tiny random-init model with the real tokenizer of ``name`` into ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = hub_path(name)
    cfg = AutoConfig.from_pretrained(src)
    small = {
        "gpt2": dict(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=1024),
    }.get(cfg.model_type, dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                               num_key_value_heads=min(heads, getattr(cfg, "num_key_value_heads", heads) or heads),
                               intermediate_size=hidden * 2, max_position_embeddings=1024))
    if cfg.model_type != "gpt2" and hasattr(cfg, "head_dim"):
        small["head_dim"] = hidden // heads
    d = cfg.to_dict()
    d.pop("layer_types", None)  # derived from the layer count; rebuilt by the config class
    d.update(small)
    model_type = d.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(src).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory fixture: ``tiny_models("qwen")`` -> path of a saved tiny model (cached per session)."""
    cache: dict[tuple, Path] = {}
    base = tmp_path_factory.mktemp("tiny_models")

    def get(name: str, **kw) -> Path:
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_tiny_model(name, base / f"{name}-{len(cache)}", **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def hub_tokenizer():
    """Factory fixture: ``hub_tokenizer("qwen")`` -> the real tokenizer (pad/eos rules applied)."""
    from mckd.models.tokenizers import load_tokenizer

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_tokenizer(str(hub_path(name)), what=name)
        return cache[name]

    return get


WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def write_word_data(d: Path, n_train: int = 8, n_dev: int = 2) -> Path:
    """A tiny train/dev jsonl pair ("List words after X." -> a few words) for entry-point runs."""
    import json

    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in range(n):
                out = " ".join(WORDS[(i + k) % 8] for k in range(2 + i % 3)) + "."
                f.write(json.dumps({"instruction": f"List words after {WORDS[i % 8]}.", "input": "",
                                    "output": out}) + "\n")
    return d


def run_distillation(argv: list[str]) -> int:
    """Run ``code/distillation.py``'s ``main`` in-process and return its exit code."""
    import distillation

    return distillation.main([str(a) for a in argv])

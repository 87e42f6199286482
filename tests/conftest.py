"""Shared test fixtures: tiny models and tokenizers built by the tests themselves, and paths to
the published assets of ../shared (tests that need those skip cleanly when they are absent).

``tiny_models(name)`` builds a 2-layer, hidden-64 random-init model of the architecture of ``name``
(GPT-2, Qwen2, Llama, Mistral) with a small tokenizer trained in seconds on generated text in the
style of that family: byte-level BPE with the ``Ġ`` space marker for GPT-2 and Qwen,
SentencePiece-style BPE with ``▁`` for Llama and Mistral. The vocabularies keep the pairs of the
published scripts: GPT-2 and Qwen differ, TinyLLaMA and Llama-2 share one, Mistral differs from
both. So every path, the cross-tokenizer ones included, runs without ../shared.
``tiny_models(name, real=True)`` keeps the real vocabulary of ../shared/model_hub instead.

``MCKD_SHARED`` overrides where ../shared is looked for (``MCKD_SHARED=/nonexistent`` runs the
suite as a fresh clone without it).
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
# the launchers (deepspeed, torchrun) of this interpreter's environment, also when it is not activated
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

# The suite runs on 2 cores: keep intra-op threads low so parallel work does not thrash.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

HUB = {
    "gpt2": "gpt2/gpt2-base",
    "qwen": "qwen/Qwen1.5-1.8B",
    "llama2": "llama2/llama2-7b-hf",
    "mistral": "mistral/mistral-7b-v0.1",
    "tinyllama": "tinyllama/tinyllama-1.1b-3T",
}

# Stand-ins for HUB: name -> (tokenizer, model type, config overrides). A tokenizer is (style,
# vocabulary size, corpus seed); one is trained per distinct triple, so llama2 and tinyllama share
# a vocabulary as the real ones do, and the cross-vocabulary pairs learn their merges from
# different generated text, so their ids differ. Untied heads and grouped-query attention as in
# the real configs.
STAND_INS = {
    "gpt2": (("byte_level", 1024, 1), "gpt2", {}),
    "qwen": (("byte_level", 1024, 2), "qwen2", {"tie_word_embeddings": False}),
    "llama2": (("llama_style", 960, 1), "llama", {"tie_word_embeddings": False}),
    "tinyllama": (("llama_style", 960, 1), "llama", {"tie_word_embeddings": False, "num_key_value_heads": 2}),
    "mistral": (("llama_style", 896, 2), "mistral", {"tie_word_embeddings": False, "num_key_value_heads": 2}),
}
# Text the stand-in tokenizers are trained on besides the generated tasks: the words of the
# entry-point data below and a little ordinary prose with punctuation, digits and accents.
EXTRA_TEXT = [
    "The quick brown fox jumps over the lazy dog. Name three primary colours: red, blue and yellow!",
    "Translate to French. Good morning, my friend! Bonjour, mon ami ! \u00c7a va tr\u00e8s bien, merci.",
    "Summarise the text below in one line. Explain dynamic time warping in one sentence, please.",
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request. ### Instruction: ### Input: ### Response:",
    "In 1969, 3 astronauts flew 384400 km; 12.5% of 80 is 10 (see page 42).",
    # characters outside ASCII: a SentencePiece-style vocabulary only knows those it saw
    "\u00c0 bient\u00f4t, caf\u00e9 na\u00efve \u00e4 \u00a9 \u00b1 \u0394 \u2014 done \U0001F642 \U0001F600 "
    "\u4f60\u597d\u4e16\u754c\tand tabs",
]


def shared_path(*parts: str) -> Path:
    """Path under ../shared, or skip the test when the asset is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared asset {p} not available")
    return p


def hub_path(name: str) -> Path:
    return shared_path("model_hub", HUB[name])


def _write_config(model_type: str, tok, out_dir: Path, overrides: dict) -> None:
    """A small config of ``model_type`` with the vocabulary and special ids of ``tok``."""
    from transformers import AutoConfig

    ids = {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
           "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if model_type == "gpt2":
        sizes = dict(n_layer=2, n_embd=64, n_head=4, n_positions=1024)
    else:
        sizes = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=128, max_position_embeddings=1024)
    AutoConfig.for_model(model_type, vocab_size=len(tok), **ids, **{**sizes, **overrides}).save_pretrained(out_dir)


def build_stand_in_hub(out: Path) -> Path:
    """Write ``out/<name>/`` (config.json + tokenizer files, no weights) for every name of
    :data:`STAND_INS`, like ../shared/model_hub holds the real ones. Deterministic."""
    from transformers import AutoTokenizer

    from mckd.tiny.tasks import generate_splits, training_record
    from mckd.tiny.train_tokenizers import corpus, train_byte_level_bpe, train_llama_style_bpe

    trainers = {"byte_level": train_byte_level_bpe, "llama_style": train_llama_style_bpe}
    for name, ((style, vocab, seed), model_type, overrides) in STAND_INS.items():
        tok_dir = out / "tokenizers" / f"{style}-{vocab}-{seed}"
        if not tok_dir.is_dir():
            records = generate_splits({"teacher_train": 300, "dev": 1, "test": 1}, seed=seed)["teacher_train"]
            texts = corpus([training_record(r) for r in records]) + EXTRA_TEXT + [
                f"List words after {w}. {' '.join(WORDS[i:] + WORDS[:i])}." for i, w in enumerate(WORDS)]
            trainers[style](texts, tok_dir, vocab_size=vocab)
        AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True).save_pretrained(out / name)
        # the model type may choose the tokenizer class (qwen2 rebuilds a Qwen2 tokenizer), so the
        # vocabulary size is read back through the config written next to the tokenizer
        _write_config(model_type, AutoTokenizer.from_pretrained(str(tok_dir)), out / name, overrides)
        _write_config(model_type, AutoTokenizer.from_pretrained(str(out / name)), out / name, overrides)
    return out


@pytest.fixture(scope="session")
def stand_in_hub(tmp_path_factory) -> Path:
    """The stand-in model hub (see :func:`build_stand_in_hub`), built once per test run and shared
    by the xdist workers through a file lock."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    hub, done = root / "stand_in_hub", root / "stand_in_hub.done"
    with FileLock(str(root / "stand_in_hub.lock")):
        if not done.is_file():
            build_stand_in_hub(hub)
            done.write_text("ok\n")
    return hub


def build_tiny_model(src: Path, out_dir: Path, *, layers: int = 2, hidden: int = 64,
                     heads: int = 4, seed: int = 0) -> Path:
    """Save a tiny random-init model with the config family and tokenizer of hub folder ``src``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
def tiny_models(tmp_path_factory, stand_in_hub):
    """Factory fixture: ``tiny_models("qwen")`` -> path of a saved tiny model with the stand-in
    tokenizer, ``tiny_models("qwen", real=True)`` with the real one (skips without ../shared);
    cached per session."""
    cache: dict[tuple, Path] = {}
    base = tmp_path_factory.mktemp("tiny_models")

    def get(name: str, *, real: bool = False, **kw) -> Path:
        key = (name, real, tuple(sorted(kw.items())))
        if key not in cache:
            src = hub_path(name) if real else stand_in_hub / name
            cache[key] = build_tiny_model(src, base / f"{name}-{len(cache)}", **kw)
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


@pytest.fixture(scope="session")
def tiny_tokenizer(stand_in_hub):
    """Factory fixture: ``tiny_tokenizer("qwen")`` -> the stand-in tokenizer of ``qwen``."""
    from mckd.models.tokenizers import load_tokenizer

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_tokenizer(str(stand_in_hub / name), what=name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def any_tokenizer(hub_tokenizer, tiny_tokenizer):
    """Factory fixture for tests run on both kinds: ``"tiny-qwen"`` -> the stand-in, ``"qwen"`` ->
    the real tokenizer (skips without ../shared)."""
    return lambda name: tiny_tokenizer(name[5:]) if name.startswith("tiny-") else hub_tokenizer(name)


@pytest.fixture(scope="session")
def mined_map(tmp_path_factory, any_tokenizer):
    """Factory fixture: ``mined_map("tiny-qwen", "tiny-gpt2")`` -> path of the MinED teacher ->
    student id map, built with ``mckd.data.vocab_map`` (once per session and pair)."""
    from mckd.data import vocab_map as vm

    base = tmp_path_factory.mktemp("vocab_maps")
    cache: dict = {}

    def get(teacher: str, student: str) -> Path:
        if (teacher, student) not in cache:
            path = base / f"{teacher}_to_{student}.json"
            vm.save_vocab_map(vm.build_vocab_map_for_tokenizers(any_tokenizer(teacher), any_tokenizer(student)),
                              path)
            cache[teacher, student] = path
        return cache[teacher, student]

    return get


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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

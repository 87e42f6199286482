"""The embedded default: determinism, schema, tokenizers and models (mckd.tiny)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mckd.data.examples import read_examples, render_prompt
from mckd.tiny.build import build
from mckd.tiny.tasks import FAMILIES, generate_splits, training_record

SPLITS = {"teacher_train": 300, "dev": 20, "test": 30}
SMALL = {**SPLITS, "train": 120}


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    manifest = build(base / "data", base / "models", sizes=SMALL, student_vocab=400, teacher_vocab=600)
    return base, manifest


def test_generation_is_deterministic_and_seed_dependent():
    a, b = generate_splits(SPLITS, seed=3), generate_splits(SPLITS, seed=3)
    assert a == b
    assert generate_splits(SPLITS, seed=4)["teacher_train"] != a["teacher_train"]


def test_splits_are_disjoint_and_cover_every_family():
    splits = generate_splits(SPLITS, seed=0)
    prompts = {k: {r["prompt"] for r in v} for k, v in splits.items()}
    assert not prompts["teacher_train"] & prompts["test"]
    assert not prompts["teacher_train"] & prompts["dev"]
    assert not prompts["dev"] & prompts["test"]
    assert {r["category"] for r in splits["teacher_train"]} == set(FAMILIES)
    for rec in splits["teacher_train"]:
        assert rec["prompt"] == render_prompt(rec["instruction"], rec["input"])
        assert len(rec["output"]) >= 3 and all(o.strip() for o in rec["output"])


def test_answers_have_several_phrasings_drawn_with_unequal_weights():
    recs = generate_splits({"teacher_train": 2000, "dev": 1, "test": 1}, seed=1)["teacher_train"]
    for fam in FAMILIES:
        drawn = {}
        for r in recs:
            if r["category"] == fam:
                # which phrasing was drawn: its position among the record's phrasings in their
                # generation order (the drawn one comes first in ``output``)
                key = sorted(r["output"]).index(r["output"][0])
                drawn[key] = drawn.get(key, 0) + 1
        assert len(drawn) >= 3, (fam, drawn)                       # real entropy
        assert max(drawn.values()) > 1.3 * min(drawn.values())     # one phrasing more likely


def test_answers_are_correct_for_checkable_families():
    for rec in generate_splits({"teacher_train": 200, "dev": 1, "test": 1}, seed=1)["teacher_train"]:
        if rec["category"] == "sorting":
            nums = [int(x) for x in rec["input"].split(", ")]
            desc = "largest to smallest" in rec["instruction"]
            bare = min(rec["output"], key=len)
            assert [int(x) for x in bare.split(", ")] == sorted(nums, reverse=desc)
            assert all(o.endswith(bare) or o.endswith(bare + ".") for o in rec["output"])
        elif rec["category"] == "reversal":
            assert min(rec["output"], key=len).split() == rec["input"].split()[::-1]
    assert training_record({"output": ["a", "b"]})["output"] == "a"


def test_unknown_family_is_reported():
    with pytest.raises(ValueError, match="unknown task families"):
        generate_splits(SMALL, families=("sorting", "poetry"))


def test_build_is_deterministic(built, tmp_path):
    base, _ = built
    build(tmp_path / "data", tmp_path / "models", sizes=SMALL, student_vocab=400, teacher_vocab=600)
    assert _digests(base / "data") == _digests(tmp_path / "data")
    assert _digests(base / "models") == _digests(tmp_path / "models")


def test_build_skips_when_up_to_date(built):
    base, manifest = built
    stamp = (base / "models" / "student" / "config.json").stat().st_mtime_ns
    again = build(base / "data", base / "models", sizes=SMALL, student_vocab=400, teacher_vocab=600)
    assert again == manifest
    assert (base / "models" / "student" / "config.json").stat().st_mtime_ns == stamp


def test_data_schema_and_the_student_subset(built):
    base, manifest = built
    for split, n in (("train", 120), ("dev", 20), ("test", 30), ("valid", 30),
                     ("teacher/train", 300), ("teacher/dev", 20)):
        examples = read_examples(base / "data" / f"{split}.jsonl")
        assert len(examples) == n
        assert all(e.prompt.endswith("### Response:\n") for e in examples)
        # training files hold the drawn phrasing, evaluation files every reference
        assert all((len(e.outputs) == 1) == split.endswith("train") for e in examples)
    rec = json.loads((base / "data" / "train.jsonl").read_text().splitlines()[0])
    assert set(rec) == {"instruction", "input", "output", "prompt", "category"}
    assert isinstance(rec["output"], str)
    test = json.loads((base / "data" / "test.jsonl").read_text().splitlines()[0])
    assert isinstance(test["output"], list) and len(test["output"]) >= 3
    teacher = (base / "data" / "teacher" / "train.jsonl").read_text().splitlines()
    assert (base / "data" / "train.jsonl").read_text().splitlines() == teacher[:120]
    assert manifest["records"] == {"teacher_train": 300, "train": 120, "dev": 20, "test": 30}
    with pytest.raises(ValueError, match="subset"):
        build(base / "x", base / "y", sizes={**SMALL, "train": 301})


@pytest.mark.parametrize("which,eos", [("student", "<|endoftext|>"), ("teacher", "</s>")])
def test_tokenizers_round_trip_with_offsets(built, which, eos):
    from mckd.models.tokenizers import load_tokenizer

    base, _ = built
    tok = load_tokenizer(str(base / "models" / "tokenizers" / which))
    assert tok.is_fast and tok.eos_token == eos and tok.pad_token_id is not None
    for ex in read_examples(base / "data" / "test.jsonl")[:10]:
        text = ex.prompt + ex.outputs[0]
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        assert tok.decode(enc["input_ids"]) == text
        # offsets are increasing and cover the text without gaps beyond the space markers
        spans = enc["offset_mapping"]
        assert all(a <= b for a, b in spans) and spans[-1][1] == len(text)
        assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


def test_teacher_tokenizer_segments_like_llama(built):
    from mckd.models.tokenizers import load_tokenizer

    base, _ = built
    s = load_tokenizer(str(base / "models" / "tokenizers" / "student"))
    t = load_tokenizer(str(base / "models" / "tokenizers" / "teacher"))
    text = "Mia has 52 cards now. Sort: 7, 31, 64."
    pieces = t.convert_ids_to_tokens(t.encode(text, add_special_tokens=False))
    assert "\u25815" not in pieces and "5" in pieces and "2" in pieces      # digits one by one
    assert all(len(p.strip("\u2581")) <= 1 or p.strip("\u2581").isalnum() for p in pieces)  # no word+punct
    assert "\u2581now" in pieces and "." in pieces
    # the student (GPT-2 style) attaches the space to the number, the teacher does not
    spieces = s.convert_ids_to_tokens(s.encode(text, add_special_tokens=False))
    assert any(p.startswith("\u0120") and p[1:].isdigit() for p in spieces)
    assert "\u2581" in pieces
    assert len(t) > len(s)


def test_tokenizers_segment_differently(built):
    from mckd.models.tokenizers import load_tokenizer

    base, _ = built
    s = load_tokenizer(str(base / "models" / "tokenizers" / "student"))
    t = load_tokenizer(str(base / "models" / "tokenizers" / "teacher"))
    text = read_examples(base / "data" / "test.jsonl")[0].prompt
    s_spans = s(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    t_spans = t(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert s_spans != t_spans
    assert s.get_vocab() != t.get_vocab()


def test_models_load_and_match_tokenizers(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, manifest = built
    expect = {"student": ("gpt2", "student"), "teacher": ("llama", "teacher"),
              "teacher_same_vocab": ("gpt2", "student")}
    for name, (model_type, tok_name) in expect.items():
        path = base / "models" / name
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        ref = AutoTokenizer.from_pretrained(base / "models" / "tokenizers" / tok_name)
        assert model.config.model_type == model_type
        assert model.config.vocab_size == len(tok) and tok.get_vocab() == ref.get_vocab()
        # loaded next to its config, the tokenizer keeps its own pipeline (transformers may swap in
        # the architecture's tokenizer class, which would segment and decode differently)
        text = "The favorite color of Vera is brown.\nSort: 3, 1"
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert model.config.eos_token_id == tok.eos_token_id
        assert sum(p.numel() for p in model.parameters()) == manifest["parameters"][name]
        ids = torch.tensor([tok.encode("Sort the numbers.", add_special_tokens=False)])
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    p = manifest["parameters"]
    assert p["teacher"] > 4 * p["student"] and p["teacher_same_vocab"] > 4 * p["student"]

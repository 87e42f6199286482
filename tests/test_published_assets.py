"""Checks against the published assets in ../shared: the real tokenizers of GPT-2, Qwen1.5,
TinyLLaMA, Mistral and Llama-2, the processed Dolly and evaluation sets, and the published MinED
teacher -> student id maps.

Every other test runs on the stand-in hub and data the suite builds itself (``conftest.py``); the
checks here repeat some of them on the real tokenizations, where segmentations, word markers and
special tokens are those of the models the scripts train. Without ../shared this module is skipped
as a whole, with one reason.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, SHARED, hub_path, shared_path

_NEEDED = ("model_hub", "data", "reference")
if not all((SHARED / d).is_dir() for d in _NEEDED):
    pytest.skip(f"the published assets are absent ({SHARED}/{{{','.join(_NEEDED)}}})", allow_module_level=True)

import test_alignment as alignment  # noqa: E402  (after the skip: helpers of the stand-in checks)
import test_build_batch as build_batch  # noqa: E402
import test_criteria_e2e as criteria_e2e  # noqa: E402
import test_data_pipeline as pipeline  # noqa: E402
import test_data_prompts as prompts  # noqa: E402
import test_exact_alignment as exact_alignment  # noqa: E402
import test_mcw_e2e as mcw_e2e  # noqa: E402
import test_smoke_fixtures as smoke  # noqa: E402
import test_vocab_map as vocab_map_tests  # noqa: E402
from conftest import write_word_data  # noqa: E402
from mckd.data import DistillCollator, build_dataset  # noqa: E402
from mckd.data import vocab_map as vm  # noqa: E402
from mckd.data.prompts import build_prompt_dataset  # noqa: E402

REAL_PAIRS = [("gpt2", "qwen"), ("tinyllama", "mistral")]  # (student, teacher)
MAPS = {"qwen_to_gpt2": ("qwen", "gpt2"), "mistral_to_tinyllama": ("mistral", "tinyllama")}


def reference_map(pair: str) -> list[int]:
    return vm.load_vocab_map(shared_path("reference", "vocab_alignment", pair, "tea2stu_id_mapping.json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_word_data(tmp_path_factory.mktemp("published_assets_data"))


def _short_dolly(tmp_path, n_first=40, keep=4):
    """The ``keep`` shortest of the first ``n_first`` Dolly dev rows (keeps the oracles fast)."""
    lines = open(shared_path("data", "dolly", "dev.jsonl"), encoding="utf-8").readlines()[:n_first]
    lines.sort(key=lambda x: len(json.loads(x)["prompt"]) + len(json.loads(x)["output"]))
    path = tmp_path / "dev_short.jsonl"
    path.write_text("".join(lines[:keep]), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- tokenizers and data
def test_tiny_models_with_real_vocabularies_load_with_their_tokenizers(tiny_models):
    smoke.check_tiny_models(tiny_models, real=True)


def test_word_markers_and_vocabulary_styles(hub_tokenizer):
    alignment.check_word_markers(hub_tokenizer, "")
    vocab_map_tests.check_vocabulary_styles(hub_tokenizer, "")


@pytest.mark.parametrize("student,teacher", REAL_PAIRS)
def test_alignment_features_match_the_oracle(tmp_path, hub_tokenizer, student, teacher):
    s, t = hub_tokenizer(student), hub_tokenizer(teacher)
    (tmp_path / "records").mkdir()
    alignment.check_batch_features(tmp_path / "records", s, t)
    _, batch = alignment.rows_for(_short_dolly(tmp_path), s, t, tmp_path / "dolly")
    alignment.check_against_oracle(batch, s, t)


@pytest.mark.parametrize("student,teacher", REAL_PAIRS)
def test_labels_masks_offsets(tmp_path, hub_tokenizer, student, teacher):
    s, t = hub_tokenizer(student), hub_tokenizer(teacher)
    pipeline.check_labels_masks_offsets(tmp_path, s, t)
    dev = shared_path("data", "dolly", "dev.jsonl")
    recs = [json.loads(line) for line in open(dev, encoding="utf-8")][:16]
    ds = build_dataset(dev, student_tokenizer=s, teacher_tokenizer=t, cache_dir=tmp_path / "dolly", limit=16)
    assert len(ds) == 16
    batch = DistillCollator(s.pad_token_id, t.pad_token_id)([ds[i] for i in range(16)])
    pipeline.check_side(batch, "", s, pipeline.texts(recs))
    pipeline.check_side(batch, "teacher_", t, pipeline.texts(recs))


@pytest.mark.parametrize("student,teacher", REAL_PAIRS)
def test_exact_pairs(tmp_path, hub_tokenizer, student, teacher):
    exact_alignment.check_exact_pairs(tmp_path, hub_tokenizer(student), hub_tokenizer(teacher), student)


def test_batch_from_text_equals_the_cached_pipeline(hub_tokenizer, tmp_path):
    dev = shared_path("data", "dolly", "dev.jsonl")
    for student, teacher in REAL_PAIRS:
        s, t = hub_tokenizer(student), hub_tokenizer(teacher)
        kw = dict(max_length=256, max_prompt_length=128, limit=12)
        features = build_batch.FEATURES[-1]
        want, _ = build_batch.pipeline_batch(dev, s, t, features, tmp_path / student, build_batch.shuffled(4), **kw)
        kw.pop("limit")
        got = build_batch.text_batch(dev, s, t, features, want["example_index"].tolist(), **kw)
        build_batch.assert_same(got, want)
        assert (got["mined_teacher_index"] >= 0).any() and got["dtw_mask"].sum() > 0


def test_evaluation_prompts(hub_tokenizer):
    for rel in [("dolly", "valid.jsonl"), ("vicuna", "valid.jsonl")]:
        rows = build_prompt_dataset(shared_path("data", *rel), hub_tokenizer("gpt2"), limit=32)
        assert len(rows) == 32 and all(r["references"] for r in rows)
        assert all(len(r["prompt_ids"]) <= 256 for r in rows)
    for name in ("gpt2", "mistral"):
        for limit in (8, 30, 60, 1000):
            prompts.check_prompt_offsets(hub_tokenizer(name), limit)


# --------------------------------------------------------------------------- published MinED maps
def _slice_ids(n_teacher: int, k: int) -> list[int]:
    """Every k-th teacher id plus the special tail: mostly edit-distance cases, some exact."""
    return sorted(set(range(0, n_teacher, k)) | set(range(n_teacher - 5, n_teacher)))


@pytest.mark.parametrize("pair,stride", [("qwen_to_gpt2", 151), ("mistral_to_tinyllama", 37)])
def test_slice_agrees_with_the_published_map(pair, stride, hub_tokenizer):
    teacher, student = (hub_tokenizer(n) for n in MAPS[pair])
    ref = reference_map(pair)
    t_tokens, s_tokens = vm.vocabulary_tokens(teacher), vm.vocabulary_tokens(student)
    assert len(ref) == len(t_tokens)
    ids = _slice_ids(len(t_tokens), stride)
    specials = dict(vm.special_token_pairs(teacher, student))
    got = vm.build_vocab_map([t_tokens[i] for i in ids], s_tokens,
                             special_pairs=[(j, specials[i]) for j, i in enumerate(ids) if i in specials])
    n_exact = sum(t_tokens[i] in set(s_tokens) for i in ids)
    assert 0 < n_exact < len(ids)                      # both rules are exercised
    agree = sum(g == ref[i] for g, i in zip(got, ids))
    assert agree == len(ids), f"{pair}: {agree}/{len(ids)} agree"


@pytest.mark.slow
def test_full_mistral_to_tinyllama_map_agrees(tmp_path):
    out = tmp_path / "m2t.json"
    assert vm.main(["--teacher", str(hub_path("mistral")), "--student", str(hub_path("tinyllama")),
                    "--out", str(out)]) == 0
    got, ref = vm.load_vocab_map(out), reference_map("mistral_to_tinyllama")
    assert len(got) == len(ref) == 32000
    assert sum(a == b for a, b in zip(got, ref)) == len(ref)  # measured: 32000/32000 (docs/mined.md)


# --------------------------------------------------------------------------- training on real vocabularies
@pytest.mark.slow
def test_mined_on_real_vocabularies_with_the_published_map(tmp_path, tiny_models, data):
    """GPT-2 <- Qwen1.5 with their real vocabularies and the published teacher -> student map."""
    train, _ = criteria_e2e._matrix_run(tmp_path / "run", tiny_models, data, "min_edit_dis_kld", "gpt2-qwen",
                                        False, real=True)
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["kd_loss"]) and 0.0 < r["aligned_fraction"] <= 1.0 for r in train)


@pytest.mark.slow
def test_mcw_tinyllama_from_mistral_lora_deepspeed_reference_preset(tmp_path, tiny_models, data):
    """The real vocabularies cut the word data differently (on the stand-ins they cut alike, edit
    cost 0), so the reference preset's DTW edit cost arrives non-zero from the data pipeline."""
    pytest.importorskip("deepspeed")
    student, teacher = tiny_models("tinyllama", real=True), tiny_models("mistral", real=True, seed=1)
    save = tmp_path / "ds"
    mcw_e2e._run(mcw_e2e._argv(
        student, teacher, data, save, "--total-iters", "2", "--peft", "lora", "--peft-lora-r", "4",
        "--gradient-accumulation-steps", "2", "--mcw-preset", "reference", "--mcw-update-interval", "1",
        "--deepspeed", "--deepspeed_config", str(ROOT / "configs" / "deepspeed" / "ds_config_fp32.json")))
    rows = mcw_e2e._train_rows(save)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["ot_logits"] > 0 and r["ot_hidden"] > 0
        assert r["stat/c_hidden_align"] > 0
    ckpt = mcw_e2e._ckpt(save, 2)
    assert (ckpt / "adapter_config.json").is_file()
    state = torch.load(ckpt / "criterion.pt", map_location="cpu", weights_only=False)
    assert state["progress"].tolist() == [1, 2]

"""build_batch: a batch built from raw text equals the collated rows of the cached pipeline.

Checked on two tokenizers the test trains itself (byte-level BPE student, Metaspace BPE teacher:
different segmentations and word markers, so both alignment features are non-trivial); the real
tokenizer pairs in test_published_assets.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from mckd.data import DistillCollator, build_batch, build_dataset
from mckd.data import alignment as al
from mckd.data.examples import encode_prompt, read_examples, render_prompt

FEATURES = [(), (al.MINED,), (al.DTW,), (al.MINED, al.DTW)]
# texts the tiny corpus never saw: unknown characters, runs of spaces, tabs, newlines, an emoji
ODD = [
    {"instruction": "Count   spaces\tand tabs", "input": "", "output": "1  2\t3 — done 🙂 ok"},
    {"instruction": "Translate to French.", "input": "Good morning, my friend!",
     "output": "Bonjour, mon ami ! Ça va très bien.\nÀ bientôt."},
    {"prompt": render_prompt("Say hi."), "output": ["Hi!", "Hello!"]},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(student tokenizer, teacher tokenizer, jsonl path) trained and written by the test."""
    from mckd.models.tokenizers import load_tokenizer
    from mckd.tiny.tasks import generate_splits
    from mckd.tiny.train_tokenizers import corpus, train_byte_level_bpe, train_llama_style_bpe

    base = tmp_path_factory.mktemp("build_batch")
    splits = generate_splits({"train": 200, "dev": 12, "test": 1}, seed=7)
    texts = corpus(splits["train"])
    s = load_tokenizer(str(train_byte_level_bpe(texts, base / "student", vocab_size=400)), what="student")
    t = load_tokenizer(str(train_llama_style_bpe(texts, base / "teacher", vocab_size=500)), what="teacher")
    path = base / "dev.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for rec in splits["dev"] + ODD:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return s, t, path


def pipeline_batch(path, s, t, alignment, cache_dir, order, **kw):
    """What training sees: cached rows of the file, ``order`` picked, through the collator."""
    ds = build_dataset(path, student_tokenizer=s, teacher_tokenizer=t, alignment=alignment,
                       cache_dir=cache_dir, **kw)
    rows = [ds[i] for i in order(len(ds))]
    collate = DistillCollator(s.pad_token_id, None if t is None else t.pad_token_id, alignment=alignment)
    return collate(rows), ds


def text_batch(path, s, t, alignment, example_index, **kw):
    examples = read_examples(path)
    return build_batch([examples[i].prompt for i in example_index],
                       [examples[i].outputs[0] for i in example_index],
                       student_tokenizer=s, teacher_tokenizer=t, alignment=alignment,
                       example_index=example_index, **kw)


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def shuffled(seed):
    return lambda n: random.Random(seed).sample(range(n), n)


@pytest.mark.parametrize("alignment", FEATURES)
def test_equals_the_cached_pipeline(tiny, tmp_path, alignment):
    s, t, path = tiny
    want, _ = pipeline_batch(path, s, t, alignment, tmp_path, shuffled(0))
    got = text_batch(path, s, t, alignment, want["example_index"].tolist())
    assert_same(got, want)
    if al.MINED in alignment:
        assert (got["mined_teacher_index"] >= 0).any()
    if al.DTW in alignment:
        assert got["dtw_mask"].sum() > 0 and got["dtw_value"].sum() > 0


def test_student_only_batch(tiny, tmp_path):
    s, _, path = tiny
    want, _ = pipeline_batch(path, s, None, (), tmp_path, shuffled(1))
    got = text_batch(path, s, None, (), want["example_index"].tolist())
    assert_same(got, want)
    assert not any(k.startswith("teacher_") for k in got)


def test_truncation_and_dropped_examples(tiny, tmp_path):
    """Lengths that truncate prompts and responses and drop some examples entirely."""
    s, t, path = tiny
    examples = read_examples(path)
    longest = sorted(max(len(encode_prompt(tok, e.prompt, 10_000)) for tok in (s, t)) for e in examples)
    kw = dict(max_length=longest[len(longest) // 2], max_prompt_length=10_000)
    want, ds = pipeline_batch(path, s, t, FEATURES[-1], tmp_path, shuffled(2), **kw)
    assert 0 < ds.n_dropped < len(examples)
    got = text_batch(path, s, t, FEATURES[-1], list(range(len(examples))), drop_unlabeled=True, **kw)
    order = want["example_index"].argsort()  # build_batch keeps the given order
    assert_same(got, {k: v[order] for k, v in want.items()})
    with pytest.raises(ValueError, match=r"example \d+ .*truncated away.*drop_unlabeled=True"):
        text_batch(path, s, t, FEATURES[-1], list(range(len(examples))), **kw)
    # tail-keeping prompt truncation and truncated responses, nothing dropped
    kw = dict(max_length=longest[0] + 3, max_prompt_length=longest[0] - 5)
    want, ds = pipeline_batch(path, s, t, FEATURES[-1], tmp_path, shuffled(3), **kw)
    assert ds.n_dropped == 0
    assert_same(text_batch(path, s, t, FEATURES[-1], want["example_index"].tolist(), **kw), want)


def test_markers_default_to_the_tokenizers(tiny):
    s, t, path = tiny
    e = read_examples(path)[:3]
    args = ([x.prompt for x in e], [x.outputs[0] for x in e])
    markers = al.feature_markers(s, t, FEATURES[-1])
    assert markers == ("Ġ", "▁")
    kw = dict(student_tokenizer=s, teacher_tokenizer=t, alignment=FEATURES[-1])
    assert_same(build_batch(*args, markers=markers, **kw), build_batch(*args, **kw))
    assert build_batch(*args, **kw)["example_index"].tolist() == [0, 1, 2]


def test_bad_arguments_are_clear_errors(tiny):
    s, t, _ = tiny
    with pytest.raises(ValueError, match="build_batch.*needs a teacher"):
        build_batch(["a"], ["b"], student_tokenizer=s, alignment=(al.DTW,))
    with pytest.raises(ValueError, match="unknown alignment"):
        build_batch(["a"], ["b"], student_tokenizer=s, teacher_tokenizer=t, alignment=("no_such_feature",))
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        build_batch(["a", "b"], ["c"], student_tokenizer=s)
    with pytest.raises(ValueError, match="2 example_index"):
        build_batch(["a"], ["c"], student_tokenizer=s, example_index=[0, 1])
    with pytest.raises(ValueError, match="at least one"):
        build_batch([], [], student_tokenizer=s)
    with pytest.raises(ValueError, match=r"responses\[1\] is a NoneType"):
        build_batch(["a", "b"], ["c", None], student_tokenizer=s)
    with pytest.raises(ValueError, match="build_batch: max_length=1"):
        build_batch(["a"], ["b"], student_tokenizer=s, max_length=1)

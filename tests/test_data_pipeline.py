"""Training data pipeline: tokenisation, labels, offsets, dynamic padding, caching, errors."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from mckd.data import DistillCollator, build_dataset
from mckd.data import dataset as dataset_mod
from mckd.data.batch import STUDENT_KEYS, teacher_key
from mckd.data.examples import RESPONSE_MARKER, DataFormatError, render_prompt

PAIRS = [("tiny-gpt2", "tiny-qwen"), ("tiny-tinyllama", "tiny-mistral")]  # real pairs: test_published_assets

RECORDS = [
    {"instruction": "Name three primary colours.", "input": "", "output": "Red, blue and yellow."},
    {"instruction": "Translate to French.", "input": "Good morning, my friend!",
     "output": "Bonjour, mon ami ! Ça va très bien, merci.\nÀ bientôt."},
    {"prompt": render_prompt("Say hi."), "output": ["Hi!", "Hello!"]},
    {"instruction": "Count   spaces\tand tabs", "input": "", "output": "1  2\t3 — done 🙂 ok"},
]


@pytest.fixture(scope="module")
def toks(any_tokenizer):
    return any_tokenizer


def write_jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def texts(records):
    out = []
    for r in records:
        prompt = r.get("prompt") or render_prompt(r["instruction"], r.get("input", ""))
        output = r["output"] if isinstance(r["output"], str) else r["output"][0]
        out.append((prompt, output))
    return out


def check_side(batch, prefix, tok, pairs, *, check_offsets=True):
    """Labels, masks, positions and offsets of one side against the raw texts."""
    ids, labels = batch[prefix + "input_ids"], batch[prefix + "labels"]
    mask, pos, offs = (batch[prefix + k] for k in ("attention_mask", "position_ids", "offsets"))
    lens = mask.sum(1)
    assert ids.shape[1] == int(lens.max()), "padding must be dynamic (longest in batch)"
    for b, (prompt, output) in enumerate(pairs):
        n = int(lens[b])
        assert (mask[b, :n] == 1).all() and (mask[b, n:] == 0).all()
        assert (ids[b, n:] == tok.pad_token_id).all() and (labels[b, n:] == -100).all()
        assert pos[b, :n].tolist() == list(range(n)) and (pos[b, n:] == 0).all()
        lab = labels[b][labels[b] != -100].tolist()
        first = int((labels[b] != -100).nonzero()[0])
        # labels are shifted inputs: labels[i] == input_ids[i + 1] inside the sequence
        assert labels[b, first:n - 1].tolist() == ids[b, first + 1:n].tolist()
        assert (labels[b, :first] == -100).all()
        assert lab[-1] == tok.eos_token_id
        assert tok.decode(lab[:-1]).strip() == output.strip()
        # the prompt (inputs before the first label position + 1) decodes to the prompt text
        assert tok.decode(ids[b, :first + 1].tolist()).strip() == prompt.strip()
        if check_offsets:
            text = prompt + output
            o = offs[b, :n]
            assert (o[:, 0] <= o[:, 1]).all() and int(o.max()) <= len(text)
            assert (o[1:, 0] >= o[:-1, 0]).all(), "offsets must be monotone"
            for i in range(n):
                piece = tok.decode([int(ids[b, i])])
                if "\ufffd" in piece or not piece.strip():
                    continue  # partial UTF-8 byte token or pure whitespace
                s, e = o[i].tolist()
                assert text[s:e].strip() == piece.strip(), (i, piece, text[s:e])
            assert (offs[b, n:] == 0).all()


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_labels_masks_offsets(tmp_path, toks, student, teacher):
    check_labels_masks_offsets(tmp_path, toks(student), toks(teacher))


def check_labels_masks_offsets(tmp_path, s, t):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    ds = build_dataset(path, student_tokenizer=s, teacher_tokenizer=t, cache_dir=tmp_path / "c")
    assert len(ds) == len(RECORDS) and ds.n_dropped == 0
    batch = DistillCollator(s.pad_token_id, t.pad_token_id)([ds[i] for i in range(len(ds))])
    expected = set(STUDENT_KEYS) | {teacher_key(k) for k in STUDENT_KEYS} | {"example_index"}
    assert set(batch) == expected
    assert batch["example_index"].tolist() == list(range(len(RECORDS)))
    check_side(batch, "", s, texts(RECORDS))
    check_side(batch, "teacher_", t, texts(RECORDS))


def test_no_teacher_and_dynamic_padding(tmp_path, toks):
    s = toks("tiny-gpt2")
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    ds = build_dataset(path, student_tokenizer=s, cache_dir=tmp_path / "c", max_length=512)
    collate = DistillCollator(s.pad_token_id)
    full = collate([ds[i] for i in range(len(ds))])
    assert set(full) == set(STUDENT_KEYS) | {"example_index"}
    one = collate([ds[0]])
    assert one["input_ids"].shape[1] == len(ds[0]["input_ids"]) < full["input_ids"].shape[1] < 512
    assert torch.equal(one["labels"][0], full["labels"][0, : one["labels"].shape[1]])


def test_prompt_tail_kept_and_truncation(tmp_path, toks):
    s = toks("tiny-gpt2")
    long_input = " ".join(f"word{i}" for i in range(400))
    rec = {"instruction": "Summarise.", "input": long_input, "output": "Short summary."}
    path = write_jsonl(tmp_path / "long.jsonl", [rec])
    ds = build_dataset(path, student_tokenizer=s, cache_dir=tmp_path / "c", max_prompt_length=64)
    row = ds[0]
    first = next(i for i, v in enumerate(row["labels"]) if v != -100)
    assert first + 1 == 64  # prompt kept at exactly max_prompt_length tokens
    prompt_text = s.decode(row["input_ids"][: first + 1])
    assert prompt_text.endswith(RESPONSE_MARKER + "\n") and prompt_text.startswith("Below is")
    # sequence truncation: max_length cuts the response (and its eos), labels stay consistent
    ds2 = build_dataset(path, student_tokenizer=s, cache_dir=tmp_path / "c", max_prompt_length=64,
                        max_length=66)
    row2 = ds2[0]
    assert len(row2["input_ids"]) == 65 and sum(v != -100 for v in row2["labels"]) == 2
    assert row2["labels"][-1] != s.eos_token_id


def test_fully_truncated_responses_are_dropped(tmp_path, toks, caplog):
    s = toks("tiny-gpt2")
    recs = [{"instruction": "x " * 300, "input": "", "output": "kept? no"},
            {"instruction": "Short.", "input": "", "output": "Yes."}]
    path = write_jsonl(tmp_path / "t.jsonl", recs)
    with caplog.at_level(logging.WARNING, logger="mckd.data.dataset"):
        ds = build_dataset(path, student_tokenizer=s, cache_dir=tmp_path / "c", max_length=200,
                           max_prompt_length=256)
    assert len(ds) == 1 and ds.n_dropped == 1 and ds[0]["example_index"] == 1
    assert "dropped 1 of 2" in caplog.text
    assert all(any(v != -100 for v in ds[i]["labels"]) for i in range(len(ds)))


def test_cache_hit_then_miss_after_change(tmp_path, toks, monkeypatch):
    s, t = toks("tiny-gpt2"), toks("tiny-qwen")
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    cache = tmp_path / "cache"
    ds1 = build_dataset(path, student_tokenizer=s, teacher_tokenizer=t, cache_dir=cache)
    assert len(list(cache.glob("*.arrow"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenised again despite a cache hit")

    monkeypatch.setattr(dataset_mod, "_process_batch", boom)
    ds2 = build_dataset(path, student_tokenizer=s, teacher_tokenizer=t, cache_dir=cache)
    assert ds2.cache_file == ds1.cache_file
    assert [ds2[i] for i in range(len(ds2))] == [ds1[i] for i in range(len(ds1))]
    # changing the file (or an argument) changes the key: a miss, which must tokenise
    write_jsonl(path, RECORDS[:2])
    with pytest.raises(AssertionError, match="tokenised again"):
        build_dataset(path, student_tokenizer=s, teacher_tokenizer=t, cache_dir=cache)
    monkeypatch.undo()
    ds3 = build_dataset(path, student_tokenizer=s, teacher_tokenizer=t, cache_dir=cache)
    assert len(ds3) == 2 and ds3.cache_file != ds1.cache_file
    ds4 = build_dataset(path, student_tokenizer=s, cache_dir=cache)  # no teacher: another key
    assert ds4.cache_file not in (ds1.cache_file, ds3.cache_file)


@pytest.mark.parametrize("line,match", [
    ('{"instruction": "a", "output": "b"', "invalid JSON"),
    ('{"instruction": "a"}', "missing field 'output'"),
    ('{"output": "b"}', "missing field 'prompt'"),
    ('{"instruction": "a", "output": "   "}', "empty 'output'"),
    ('{"instruction": "a", "output": 3}', "must be a string"),
])
def test_bad_files_name_file_and_line_and_leave_no_cache(tmp_path, toks, line, match):
    s = toks("tiny-gpt2")
    path = write_jsonl(tmp_path / "bad.jsonl", RECORDS[:2], raw_lines=["", line])
    cache = tmp_path / "cache"
    with pytest.raises(DataFormatError, match=match) as e:
        build_dataset(path, student_tokenizer=s, cache_dir=cache)
    assert f"{path}:4" in str(e.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_bad_arguments(tmp_path, toks):
    s = toks("tiny-gpt2")
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS)
    with pytest.raises(ValueError, match="unknown alignment"):
        build_dataset(path, student_tokenizer=s, teacher_tokenizer=s, alignment=("bogus",),
                      cache_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_dataset(path, student_tokenizer=s, alignment=("dtw",), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        build_dataset(tmp_path / "nope.jsonl", student_tokenizer=s, cache_dir=tmp_path)
    with pytest.raises(KeyError, match="rows lack"):
        ds = build_dataset(path, student_tokenizer=s, cache_dir=tmp_path)
        DistillCollator(s.pad_token_id, s.pad_token_id)([ds[0]])


@pytest.mark.slow
def test_num_proc_workers_give_the_same_rows(tmp_path, toks):
    s, t = toks("tiny-gpt2"), toks("tiny-qwen")
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS * 2)
    kw = dict(student_tokenizer=s, teacher_tokenizer=t, alignment=("mined_dtw", "dtw"))
    one = build_dataset(path, cache_dir=tmp_path / "a", **kw)
    two = build_dataset(path, cache_dir=tmp_path / "b", num_proc=2, **kw)
    assert [one[i] for i in range(len(one))] == [two[i] for i in range(len(two))]
    assert one.lengths() == [len(one[i]["input_ids"]) for i in range(len(one))]
    assert one.lengths("teacher") == [len(one[i]["teacher_input_ids"]) for i in range(len(one))]

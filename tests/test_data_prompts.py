"""Generation-side data: prompt datasets and left-padded prompt batches."""
from __future__ import annotations

import json

import pytest
import torch

from mckd.data import PromptCollator, build_prompt_dataset
from mckd.data.examples import RESPONSE_MARKER, DataFormatError, render_prompt
from mckd.models.tokenizers import load_tokenizer

RECORDS = [
    {"instruction": "Name three primary colours.", "output": "Red, blue and yellow."},
    {"instruction": "Translate to French.", "input": "Good morning, my friend! " * 3,
     "output": ["Bonjour, mon ami !", "Salut !"]},
    {"prompt": render_prompt("Say hi."), "output": "Hi!"},
]


@pytest.fixture(scope="module")
def gpt2_tok(tiny_tokenizer):
    return tiny_tokenizer("gpt2")


def write(path, records, extra=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(x + "\n" for x in extra))
    return path


def test_prompt_rows(tmp_path, gpt2_tok):
    rows = build_prompt_dataset(write(tmp_path / "v.jsonl", RECORDS), gpt2_tok)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[1]["references"] == ["Bonjour, mon ami !", "Salut !"]
    assert rows[0]["references"] == ["Red, blue and yellow."]
    for r in rows:
        assert gpt2_tok.decode(r["prompt_ids"]) == r["prompt"]
        assert r["prompt"].endswith(RESPONSE_MARKER + "\n")
    assert len(build_prompt_dataset(tmp_path / "v.jsonl", gpt2_tok, limit=2)) == 2


def test_truncation_keeps_response_tail(tmp_path, gpt2_tok):
    rows = build_prompt_dataset(write(tmp_path / "v.jsonl", RECORDS), gpt2_tok, max_prompt_length=20)
    for r in rows:
        assert len(r["prompt_ids"]) <= 20
        assert gpt2_tok.decode(r["prompt_ids"]).endswith(RESPONSE_MARKER + "\n")


def test_errors_name_file_and_line(tmp_path, gpt2_tok):
    path = write(tmp_path / "bad.jsonl", RECORDS, extra=['{"instruction": "x"}'])
    with pytest.raises(DataFormatError, match=f"{path}:4: missing field 'output'"):
        build_prompt_dataset(path, gpt2_tok)
    rows = build_prompt_dataset(path, gpt2_tok, require_references=False)
    assert rows[3]["references"] == []


def test_left_padding_layout(tmp_path, gpt2_tok):
    rows = build_prompt_dataset(write(tmp_path / "v.jsonl", RECORDS), gpt2_tok)
    batch = PromptCollator(gpt2_tok.pad_token_id)(rows)
    lens = [len(r["prompt_ids"]) for r in rows]
    T = max(lens)
    assert batch["input_ids"].shape == (3, T) and batch["index"].tolist() == [0, 1, 2]
    for b, n in enumerate(lens):
        assert batch["input_ids"][b, T - n:].tolist() == rows[b]["prompt_ids"]
        assert (batch["input_ids"][b, : T - n] == gpt2_tok.pad_token_id).all()
        assert batch["attention_mask"][b].tolist() == [0] * (T - n) + [1] * n
        assert batch["position_ids"][b].tolist() == [0] * (T - n) + list(range(n))
    with pytest.raises(ValueError, match="empty batch"):
        PromptCollator(0)([])


@pytest.mark.parametrize("name", ["gpt2", "tinyllama"])
def test_left_padded_forward_matches_unpadded(tmp_path, tiny_models, name):
    """The last-position logits of a left-padded batch equal those of each prompt alone: what
    batched ``generate`` with the KV cache relies on."""
    from transformers import AutoModelForCausalLM

    path = tiny_models(name)
    tok = load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = build_prompt_dataset(write(tmp_path / "v.jsonl", RECORDS), tok)
    batch = PromptCollator(tok.pad_token_id)(rows)
    with torch.no_grad():
        padded = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        for b, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r["prompt_ids"]])).logits
            torch.testing.assert_close(padded[b, -1], alone[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-mistral"])
@pytest.mark.parametrize("limit", [8, 30, 60, 1000])
def test_prompt_offsets_follow_the_kept_tokens(any_tokenizer, name, limit):
    check_prompt_offsets(any_tokenizer(name), limit)


def check_prompt_offsets(tok, limit):
    from mckd.data.examples import encode_prompt, encode_prompt_with_offsets

    prompt = render_prompt("Summarise the text below in one line.", "lorem ipsum dolor " * 20)
    ids, offs = encode_prompt_with_offsets(tok, prompt, limit)
    assert ids == encode_prompt(tok, prompt, limit) and len(offs) == len(ids) <= limit
    # the kept tokens are a head of the prompt then the marker tail; offsets point at their text
    for i, (s, e) in zip(ids, offs):
        piece = tok.decode([i]).strip()
        if piece and "\ufffd" not in piece:
            assert prompt[s:e].strip() == piece
    assert offs[-1][1] == len(prompt)

"""Small-vocabulary models for the teacher-cache tests (no tests here).

Two tokenizers trained on the word data (byte-level BPE for the student, Metaspace BPE for the
teacher, a few hundred ids each), so a cache that stores every logit stays small. Models:

* ``student``: GPT-2, 2 layers, hidden 32, tied head;
* ``teacher``: Llama, 2 layers, hidden 48, **untied** head (the cache stores table and head);
* ``teacher_same_vocab``: GPT-2 with the student's tokenizer, 2 layers, hidden 48, tied head.

Dropout is 0 everywhere, so a live and a cached run compute the same function.
"""
from __future__ import annotations

import json
from pathlib import Path

from conftest import write_word_data


def build_pair(base: Path, *, n_train: int = 16) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from mckd.tiny.build_models import ModelSize, gpt2_config, llama_config, save_model
    from mckd.tiny.train_tokenizers import train_byte_level_bpe, train_llama_style_bpe

    data = write_word_data(base / "data", n_train=n_train, n_dev=2)
    texts = [json.loads(line)["instruction"] + " " + json.loads(line)["output"]
             for line in (data / "train.jsonl").read_text().splitlines()]
    texts += ["### Instruction:\n", "### Response:\n", "Below is an instruction that describes a task."]
    s_tok = train_byte_level_bpe(texts, base / "tok_student", vocab_size=300)
    t_tok = train_llama_style_bpe(texts, base / "tok_teacher", vocab_size=200)
    stok = AutoTokenizer.from_pretrained(str(s_tok))
    ttok = AutoTokenizer.from_pretrained(str(t_tok))
    out = {"data": data}
    for name, cfg, tok_dir, seed in (
            ("student", gpt2_config(stok, ModelSize(layers=2, hidden=32, heads=2)), s_tok, 0),
            ("teacher", llama_config(ttok, ModelSize(layers=2, hidden=48, heads=4, kv_heads=2,
                                                      intermediate=96)), t_tok, 1),
            ("teacher_same_vocab", gpt2_config(stok, ModelSize(layers=2, hidden=48, heads=4)), s_tok, 2)):
        if name == "teacher":
            cfg.tie_word_embeddings = False
        for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
            if hasattr(cfg, k):
                setattr(cfg, k, 0.0)
        save_model(cfg, tok_dir, base / name, seed=seed)
        out[name] = base / name
    return out


def build(teacher: Path, data: Path, output: Path, **kw):
    from mckd.teacher_cache.build import build_cache

    args = dict(max_length=48, max_prompt_length=32, top_k=10 ** 6, dtype="fp32", batch_size=3, shard_size=4)
    args.update(kw)
    return build_cache(teacher_model_path=str(teacher), output=str(output), data_file=str(data / "train.jsonl"),
                       **args)

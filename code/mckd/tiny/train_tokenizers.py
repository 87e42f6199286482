"""Two tokenizers trained on the generated data, segmenting text the way GPT-2 and Llama/Qwen do.

* student: byte-level BPE, GPT-2 style (GPT-2's pre-tokenisation regex, so letters, digit runs
  and punctuation are separate pre-tokens; ``Ġ`` space marker, byte alphabet, eos
  ``<|endoftext|>``, pad = eos as for GPT-2). Digit runs merge (`` 52`` is one token).
* teacher: Llama style, with a vocabulary twice the student's: Metaspace pre-tokenizer (``▁``
  space marker), individual digits, punctuation split from words, newline as its own piece, BPE,
  special tokens ``<unk>``, ``<s>``, ``</s>`` (eos), ``<pad>``. (A Unigram model was tried first:
  on this highly repetitive corpus its pruning left pieces such as ``▁R`` + ``esponse`` and
  sequences 1.7x longer than BPE's, which only slows the teacher down.)

Both are saved as fast HF tokenizers (``tokenizer.json`` + ``tokenizer_config.json``), so
``mckd.models.tokenizers.load_tokenizer`` loads them and ``return_offsets_mapping`` works. The two
segmentations of the same text differ (different algorithms, vocab sizes and space handling), which
is what the cross-tokenizer criteria need to be exercised on.
"""
from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

STUDENT_EOS = "<|endoftext|>"
TEACHER_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _wrap_and_save(tok, out_dir: Path, **specials: str) -> Path:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=1024, **specials)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def train_byte_level_bpe(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 1024) -> Path:
    """Train a GPT-2-style byte-level BPE and save it as a fast HF tokenizer in ``out_dir``.

    Args:
        texts: training corpus (prompts and answers).
        out_dir: directory to write ``tokenizer.json`` and ``tokenizer_config.json`` into.
        vocab_size: target vocabulary size, special token included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[STUDENT_EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    logger.info("student byte-level BPE: %d tokens", tok.get_vocab_size())
    return _wrap_and_save(tok, Path(out_dir), eos_token=STUDENT_EOS, bos_token=STUDENT_EOS,
                          unk_token=STUDENT_EOS, pad_token=STUDENT_EOS)


def train_llama_style_bpe(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 2048) -> Path:
    """Train a Llama-style (SentencePiece-like) BPE and save it in ``out_dir``.

    Pre-tokenisation as Llama/Mistral segment text: ``▁`` marks a preceding space (Metaspace),
    every digit is its own piece (`` 52`` -> ``▁``, ``5``, ``2``), punctuation is never merged into
    a word (``now.`` -> ``▁now``, ``.``) and a newline is its own piece. Every printable ASCII
    character is in the vocabulary, anything else maps to ``<unk>``.

    Args:
        texts: training corpus (prompts and answers).
        out_dir: directory to write ``tokenizer.json`` and ``tokenizer_config.json`` into.
        vocab_size: target vocabulary size, special tokens included.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=TEACHER_SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    specials = list(TEACHER_SPECIALS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=sorted(set(string.printable) - set(" \t\n\r\x0b\x0c")))
    tok.train_from_iterator(texts, trainer=trainer)
    logger.info("teacher Llama-style BPE: %d tokens", tok.get_vocab_size())
    return _wrap_and_save(tok, Path(out_dir), **TEACHER_SPECIALS)


def corpus(records: Iterable[dict]) -> list[str]:
    """The text a tokenizer is trained on: every prompt and every answer phrasing."""
    texts: list[str] = []
    for rec in records:
        texts.append(rec["prompt"])
        out = rec["output"]
        texts.extend(out if isinstance(out, list) else [out])
    return texts

"""Tiny random-init models of the embedded default, in standard HF architectures.

* ``teacher``: Llama-style (RoPE, RMSNorm, SwiGLU, grouped-query attention) with the teacher's
  SentencePiece-style tokenizer: the cross-vocabulary pair (like GPT2 <- Qwen1.5, TinyLLaMA <-
  Mistral in the papers). Not Qwen2: transformers 5 binds the ``qwen2`` model type to its
  byte-level Qwen2 tokenizer and would rebuild our Metaspace tokenizer as byte-level on load (spaces
  vanish from decoded text); the ``llama`` type keeps the tokenizer as saved.
* ``teacher_same_vocab``: GPT-2-style, larger, with the *student's* tokenizer: the same-vocabulary
  pair for vanilla KD and DSKD (like GPT2-base <- GPT2-XL).
* ``student``: GPT-2-style, smaller, byte-level BPE tokenizer.

Vocabulary sizes are read from the saved tokenizers, never passed by hand. Weights are initialised
from a fixed seed, so the same seed gives byte-identical safetensors files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSize:
    """Width and depth of one tiny model."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None  # Llama only: grouped-query attention
    intermediate: int | None = None  # Llama only: SwiGLU width (GPT-2 uses 4*hidden)


DEFAULT_SIZES = {
    "student": ModelSize(layers=2, hidden=64, heads=4),
    "teacher": ModelSize(layers=4, hidden=192, heads=6, kv_heads=2, intermediate=512),
    "teacher_same_vocab": ModelSize(layers=4, hidden=192, heads=6),
}
MAX_POSITIONS = 512


def _special_ids(tok) -> dict[str, int]:
    return {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def gpt2_config(tok, size: ModelSize):
    """A GPT-2 config sized ``size`` with the vocabulary and special ids of ``tok``."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tok), n_positions=MAX_POSITIONS, n_embd=size.hidden,
                      n_layer=size.layers, n_head=size.heads, tie_word_embeddings=True,
                      **_special_ids(tok))


def llama_config(tok, size: ModelSize):
    """A Llama config sized ``size`` with the vocabulary and special ids of ``tok``."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=size.hidden, num_hidden_layers=size.layers,
                       num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads or size.heads,
                       intermediate_size=size.intermediate or 4 * size.hidden,
                       max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                       rope_theta=10000.0, **_special_ids(tok))


def save_model(config, tokenizer_dir: str | Path, out_dir: str | Path, *, seed: int) -> int:
    """Initialise a causal LM from ``config`` with ``seed``, save it with the tokenizer files of
    ``tokenizer_dir`` into ``out_dir`` and return its parameter count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(str(out_dir))
    n = sum(p.numel() for p in model.parameters())
    logger.info("%s: %s, %.2fM parameters", out_dir, config.model_type, n / 1e6)
    return n


def build_models(student_tok_dir: str | Path, teacher_tok_dir: str | Path, out_dir: str | Path, *,
                 seed: int = 1234, sizes: dict[str, ModelSize] | None = None) -> dict[str, int]:
    """Save ``student``, ``teacher`` and ``teacher_same_vocab`` under ``out_dir``.

    Returns:
        parameter count per model name.
    """
    from transformers import AutoTokenizer

    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    stok = AutoTokenizer.from_pretrained(str(student_tok_dir), local_files_only=True)
    ttok = AutoTokenizer.from_pretrained(str(teacher_tok_dir), local_files_only=True)
    out_dir = Path(out_dir)
    return {
        "student": save_model(gpt2_config(stok, sizes["student"]), student_tok_dir,
                              out_dir / "student", seed=seed),
        "teacher": save_model(llama_config(ttok, sizes["teacher"]), teacher_tok_dir,
                              out_dir / "teacher", seed=seed + 1),
        "teacher_same_vocab": save_model(gpt2_config(stok, sizes["teacher_same_vocab"]),
                                         student_tok_dir, out_dir / "teacher_same_vocab",
                                         seed=seed + 2),
    }

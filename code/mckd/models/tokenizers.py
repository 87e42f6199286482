"""Tokenizer loading with the pad/eos rules of the published code, derived rather than hard-coded.

Rules:
* eos: the tokenizer's own eos token; if it has none, the model config's ``eos_token_id``.
  (For Qwen1.5 this is ``<|endoftext|>`` = 151643, which the published code forced by id.)
* pad: the tokenizer's pad token if it has one, else eos (every published family does pad := eos).
* Only fast tokenizers are accepted: character offsets are needed for cross-tokenizer alignment.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class TokenizerLoadError(RuntimeError):
    pass


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    """True when ``path`` holds at least one of :data:`TOKENIZER_FILES` (without them
    ``AutoTokenizer`` may build an empty tokenizer instead of failing)."""
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str, *, what: str = "model"):
    """Load a fast tokenizer from a local directory and apply the pad/eos rules.

    Args:
        path: local directory with tokenizer files (never a hub id: nothing is downloaded).
        what: label used in error messages ("student", "teacher", ...).
    """
    from transformers import AutoConfig, AutoTokenizer

    if not path or not os.path.isdir(path):
        raise TokenizerLoadError(f"{what} path {path!r} is not a local directory")
    if not has_tokenizer_files(path):
        raise TokenizerLoadError(f"{path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path in the message
        raise TokenizerLoadError(f"cannot load the {what} tokenizer from {path}: {e}") from e
    if len(tok) == 0:
        raise TokenizerLoadError(f"the {what} tokenizer at {path} is empty")
    if not getattr(tok, "is_fast", False):
        raise TokenizerLoadError(f"the {what} tokenizer at {path} is not a fast tokenizer; "
                                 "character offsets (needed for alignment) require one")
    if tok.eos_token_id is None:
        eos_id = None
        try:
            eos_id = AutoConfig.from_pretrained(path, local_files_only=True).eos_token_id
        except Exception:  # noqa: BLE001 - no config next to the tokenizer is fine
            pass
        if isinstance(eos_id, (list, tuple)):
            eos_id = eos_id[0]
        if eos_id is None:
            raise TokenizerLoadError(f"the {what} tokenizer at {path} has no eos token and no "
                                     "config eos_token_id")
        tok.eos_token = tok.convert_ids_to_tokens(int(eos_id))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def vocabulary_difference(student, teacher) -> str | None:
    """None when both tokenizers map the same tokens to the same ids (over the ids both have),
    else a short description of the difference."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    n = min(len(s_vocab), len(t_vocab))
    s_ids = {i: tok for tok, i in s_vocab.items() if i < n}
    t_ids = {i: tok for tok, i in t_vocab.items() if i < n}
    differ = sorted(i for i in set(s_ids) | set(t_ids) if s_ids.get(i) != t_ids.get(i))
    if not differ:
        return None
    i = differ[0]
    return (f"{len(differ)} of {n} ids map to different tokens (id {i}: {s_ids.get(i)!r} vs "
            f"{t_ids.get(i)!r})")

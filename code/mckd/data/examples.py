"""Reading the processed jsonl format and rendering prompts.

A record has either a pre-rendered ``prompt`` or an ``instruction`` (and optional ``input``) from
which the prompt is rendered with one of the two published Alpaca-style templates. ``output`` is a
string or a non-empty list of reference strings. Every problem is reported with file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_MARKER = "### Response:"


class DataFormatError(ValueError):
    """A malformed data file; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One record. ``outputs`` holds every reference; training uses ``outputs[0]``."""

    prompt: str
    outputs: tuple[str, ...]
    index: int
    source: str = field(default="", compare=False)  # "file:line", for messages


def decode_line(raw: bytes, where: str) -> str:
    """UTF-8 text of one line; DataFormatError naming ``where`` (file:line) and the column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                              f"{e.start + 1}); save the file as UTF-8") from None


def render_prompt(instruction: str, input_text: str = "") -> str:
    """Render the published template (with or without the input block)."""
    if input_text and input_text.strip():
        return TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return TEMPLATE_NO_INPUT.format(instruction=instruction)


def _parse_record(rec: object, where: str, *, require_output: bool) -> tuple[str, tuple[str, ...]]:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("prompt"), str) and rec["prompt"]:
        prompt = rec["prompt"].replace("<n>", "\n")
    elif isinstance(rec.get("instruction"), str) and rec["instruction"].strip():
        inp = rec.get("input") or ""
        if not isinstance(inp, str):
            raise DataFormatError(f"{where}: field 'input' must be a string")
        prompt = render_prompt(rec["instruction"], inp)
    else:
        raise DataFormatError(f"{where}: missing field 'prompt' (or 'instruction' to render it from)")
    out = rec.get("output")
    if out is None:
        if require_output:
            raise DataFormatError(f"{where}: missing field 'output'")
        return prompt, ()
    refs = (out,) if isinstance(out, str) else tuple(out) if isinstance(out, list) else None
    if refs is None or not all(isinstance(r, str) for r in refs):
        raise DataFormatError(f"{where}: field 'output' must be a string or a list of strings")
    if require_output and (not refs or not any(r.strip() for r in refs)):
        raise DataFormatError(f"{where}: empty 'output'")
    return prompt, refs


def read_examples(path: str | Path, *, require_output: bool = True, limit: int = -1) -> list[Example]:
    """Read and validate a jsonl file.

    Args:
        path: the jsonl file.
        require_output: training and evaluation need references; prompt-only use may relax it.
        limit: keep the first ``limit`` records (-1: all).

    Raises:
        FileNotFoundError: the file does not exist.
        DataFormatError: a line is not JSON, or misses/has malformed fields (file:line in message).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    examples: list[Example] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = decode_line(raw, where)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: invalid JSON ({e.msg})") from None
            prompt, refs = _parse_record(rec, where, require_output=require_output)
            examples.append(Example(prompt=prompt, outputs=refs, index=len(examples), source=where))
            if 0 <= limit <= len(examples):
                break
    if not examples:
        raise DataFormatError(f"{path}: no records")
    return examples


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    """Tokenize a prompt (no special tokens) and truncate it to ``max_prompt_length`` tokens while
    keeping the ``### Response:`` tail, so the model always sees where to answer.

    The published code right-truncated the prompt, which cut the marker off for 52% of DialogSum
    prompts. Here the text before the marker is truncated from the right
    (dropping the end of the instruction/input) and the marker tail is kept whole.
    """
    return encode_prompt_with_offsets(tokenizer, prompt, max_prompt_length)[0]


def _encode(tokenizer, text: str, shift: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and their character spans, shifted by ``shift``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(s + shift, e + shift) for s, e in enc["offset_mapping"]]


def encode_prompt_with_offsets(tokenizer, prompt: str, max_prompt_length: int
                               ) -> tuple[list[int], list[tuple[int, int]]]:
    """:func:`encode_prompt` plus the character span ``[start, end)`` of every kept token in
    ``prompt`` (needs a fast tokenizer). The ids are exactly those of :func:`encode_prompt`."""
    ids, offs = _encode(tokenizer, prompt)
    if len(ids) <= max_prompt_length:
        return ids, offs
    cut = prompt.rfind(RESPONSE_MARKER)
    if cut <= 0:
        return ids[:max_prompt_length], offs[:max_prompt_length]
    head, tail = prompt[:cut], prompt[cut:]
    tail_ids, tail_offs = _encode(tokenizer, tail, shift=cut)
    if len(tail_ids) >= max_prompt_length:
        return tail_ids[-max_prompt_length:], tail_offs[-max_prompt_length:]
    keep = max_prompt_length - len(tail_ids)
    head_ids, head_offs = _encode(tokenizer, head)
    return head_ids[:keep] + tail_ids, head_offs[:keep] + tail_offs

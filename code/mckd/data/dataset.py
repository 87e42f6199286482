"""Training data: jsonl -> tokenised (student and teacher) -> alignment features, cached on disk.

Tokenisation follows the published ``DistillDataset`` with our fixes:

* prompt: :func:`mckd.data.examples.encode_prompt` (no special tokens; truncated to
  ``max_prompt_length`` while keeping the ``### Response:`` tail instead of right-truncating);
* response: ``encode(outputs[0]) + [eos]`` (no special tokens);
* sequence = prompt + response, truncated to ``max_length``; inputs are ``seq[:-1]`` and labels
  ``seq[1:]`` with -100 on the prompt (the last prompt token predicts the first response token).
* No BOS is added, also for the LLaMA-family tokenizers whose configs set ``add_bos_token``: the
  published models were trained and evaluated this way (SFT teachers included), so a BOS would
  change the distribution the teachers' checkpoints were fitted to. Kept as published.
* Examples whose response is truncated away entirely (no label token on the student or the teacher
  side) are dropped and counted in a log message, rather than giving silent all -100 rows.

Caching: the processed rows go through ``datasets.Dataset.map`` with an explicit fingerprint
built from the data file's bytes, both tokenizers (their serialised definition and eos/pad ids),
every argument that changes the rows, and :data:`PIPELINE_VERSION`. The arrow file lives in
``cache_dir`` (default ``$MCKD_CACHE_DIR`` or ``<repo>/.cache/datasets``, git-ignored). A second
call with the same inputs loads it without tokenising; any change to the file gives a new key.
The file is read and validated first, so a malformed file raises (naming file and line) before
anything is written to the cache.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from mckd.data import alignment as al
from mckd.data.batch import IGNORE_INDEX
from mckd.data.examples import encode_prompt_with_offsets, read_examples

logger = logging.getLogger(__name__)

PIPELINE_VERSION = "1"  # bump when the rows produced for the same inputs change
_REPO_ROOT = Path(__file__).resolve().parents[3]


def default_cache_dir() -> Path:
    """``$MCKD_CACHE_DIR``, else ``<repo>/.cache/datasets`` (else ``~/.cache/mckd/datasets`` when
    the package is not run from a checkout)."""
    env = os.environ.get("MCKD_CACHE_DIR")
    if env:
        return Path(env)
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / ".cache" / "datasets"
    return Path.home() / ".cache" / "mckd" / "datasets"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash identifying what a tokenizer produces: its serialised definition, eos/pad ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    h.update(f"|{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_example(tokenizer, prompt: str, output: str, max_prompt_length: int, max_length: int):
    """Tokenise one (prompt, output) pair for one tokenizer (published rules with our fixes).

    Returns:
        dict with ``input_ids`` (n-1), ``labels`` (n-1; -100 on the prompt), ``offsets`` (n-1, 2)
        character spans of the input tokens in ``prompt + output``, ``prompt_len`` (tokens kept
        from the prompt, possibly truncated by ``max_length``), ``n_labels``, ``closes`` (n) the
        character boundary each kept sequence token closes or -1
        (:func:`mckd.data.alignment.token_closes`, computed before the ``max_length`` cut).
    """
    p_ids, p_offs = encode_prompt_with_offsets(tokenizer, prompt, max_prompt_length)
    enc = tokenizer(output, add_special_tokens=False, return_offsets_mapping=True)
    shift, end = len(prompt), len(prompt) + len(output)
    r_ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    r_offs = [(s + shift, e + shift) for s, e in enc["offset_mapping"]] + [(end, end)]
    seq, offs = (p_ids + r_ids)[:max_length], (p_offs + r_offs)[:max_length]
    closes = al.token_closes(p_offs + r_offs, end, eos_last=True)[:max_length]
    n, n_prompt = len(seq), min(len(p_ids), max_length)
    labels = list(seq[1:])
    labels[: max(n_prompt - 1, 0)] = [IGNORE_INDEX] * max(n_prompt - 1, 0)
    return {"input_ids": seq[:-1], "labels": labels, "offsets": [list(o) for o in offs[:-1]],
            "prompt_len": n_prompt, "n_labels": max(n - 1 - max(n_prompt - 1, 0), 0),
            "closes": closes}


def check_pipeline_options(student_tokenizer, teacher_tokenizer, alignment, max_length: int,
                           max_prompt_length: int, caller: str) -> tuple[str, ...]:
    """Validate the options shared by :func:`build_dataset` and :func:`mckd.data.build_batch`.

    Returns:
        ``alignment`` normalised (a tuple of known names, duplicates removed).

    Raises:
        ValueError: unknown alignment name, alignment without a teacher, lengths out of range, or
            a tokenizer that is not fast or has no eos token; the message starts with ``caller``.
    """
    alignment = al.check_alignment_names(alignment)
    if alignment and teacher_tokenizer is None:
        raise ValueError(f"{caller}(alignment={list(alignment)}) needs a teacher_tokenizer")
    if max_length < 2 or max_prompt_length < 1:
        raise ValueError(f"{caller}: max_length={max_length} must be >= 2 and "
                         f"max_prompt_length={max_prompt_length} >= 1")
    for tok, what in ((student_tokenizer, "student"), (teacher_tokenizer, "teacher")):
        if tok is not None and (tok.eos_token_id is None or not getattr(tok, "is_fast", False)):
            raise ValueError(f"{caller}: the {what} tokenizer must be a fast tokenizer with an "
                             "eos token (load it with mckd.models.tokenizers.load_tokenizer)")
    return alignment


def _process_batch(batch, *, student_tokenizer, teacher_tokenizer, max_prompt_length, max_length,
                   alignment, markers):
    """``datasets.map`` function (batched): tokenise, drop response-less rows, align."""
    cols: dict[str, list] = {}
    sides = [("", student_tokenizer)] + ([("teacher_", teacher_tokenizer)] if teacher_tokenizer else [])
    for prompt, output, index in zip(batch["prompt"], batch["output"], batch["example_index"]):
        enc = {pre: encode_example(tok, prompt, output, max_prompt_length, max_length)
               for pre, tok in sides}
        if any(e["n_labels"] == 0 for e in enc.values()):
            continue  # counted by the caller from the row count
        row: dict[str, object] = {"example_index": index}
        for pre, e in enc.items():
            for k in ("input_ids", "labels", "offsets"):
                row[pre + k] = e[k]
        if alignment:
            s, t = enc[""], enc["teacher_"]
            if al.MINED in alignment:
                s0, t0 = max(s["prompt_len"] - 1, 0), max(t["prompt_len"] - 1, 0)  # first label pos
                row["mined_teacher_index"] = al.mined_teacher_index(
                    al.token_strings(student_tokenizer, s["input_ids"][s0:], markers[0]),
                    al.token_strings(teacher_tokenizer, t["input_ids"][t0:], markers[1]),
                    s0, t0, len(s["input_ids"]))
            if al.DTW in alignment:
                row["dtw_index"], row["dtw_value"] = al.dtw_pairs(
                    al.token_strings(student_tokenizer, s["input_ids"]),
                    al.token_strings(teacher_tokenizer, t["input_ids"]))
            if al.EXACT in alignment:
                row["exact_teacher_index"], row["boundary_teacher_index"] = al.exact_teacher_index(
                    s["closes"], t["closes"], len(s["input_ids"]), len(t["input_ids"]))
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
    return cols


def _features(has_teacher: bool, alignment: tuple[str, ...]):
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List

    f = {"example_index": Value("int64")}
    for pre in ("", "teacher_") if has_teacher else ("",):
        f[pre + "input_ids"] = List(Value("int64"))
        f[pre + "labels"] = List(Value("int64"))
        f[pre + "offsets"] = List(List(Value("int64")))
    if al.MINED in alignment:
        f["mined_teacher_index"] = List(Value("int64"))
    if al.DTW in alignment:
        f["dtw_index"] = List(List(Value("int64")))
        f["dtw_value"] = List(Value("float32"))
    if al.EXACT in alignment:
        f["exact_teacher_index"] = List(Value("int64"))
        f["boundary_teacher_index"] = List(Value("int64"))
    return Features(f)


class DistillDataset(torch.utils.data.Dataset):
    """Processed training rows (a thin view over a cached ``datasets.Dataset``).

    ``ds[i]`` is a dict of python lists: ``input_ids``, ``labels``, ``offsets`` (and ``teacher_*``,
    alignment keys), plus ``example_index``. Attributes: ``hf`` (the underlying dataset),
    ``n_read`` (records in the file), ``n_dropped`` (response truncated away), ``cache_file``.
    """

    def __init__(self, hf_dataset, *, n_read: int, cache_file: str | None, has_teacher: bool,
                 alignment: tuple[str, ...]):
        self.hf = hf_dataset
        self.n_read = n_read
        self.n_dropped = n_read - len(hf_dataset)
        self.cache_file = cache_file
        self.has_teacher = has_teacher
        self.alignment = alignment
        self.exact_share: float | None = None  # share of exactly aligned label positions ("exact")

    def __len__(self) -> int:
        return len(self.hf)

    def __getitem__(self, i: int) -> dict:
        return self.hf[int(i)]

    def lengths(self, side: str = "student") -> list[int]:
        """Input lengths per row (``side`` "student" or "teacher"), e.g. for length bucketing."""
        col = "input_ids" if side == "student" else "teacher_input_ids"
        if col not in self.hf.column_names:
            raise ValueError(f"DistillDataset.lengths: no {side} side in this dataset")
        return [len(x) for x in self.hf[col]]


def build_dataset(path, *, student_tokenizer, teacher_tokenizer=None, max_length: int = 512,
                  max_prompt_length: int = 256, alignment=(), cache_dir=None, num_proc: int = 1,
                  limit: int = -1) -> DistillDataset:
    """Read, tokenise (student and optional teacher), align and cache a training/dev jsonl file.

    Args:
        path: jsonl file (the processed schema of :mod:`mckd.data.examples`).
        student_tokenizer / teacher_tokenizer: fast tokenizers (see ``load_tokenizer``).
        max_length: maximum tokens of prompt + response + eos per side (inputs have one fewer).
        max_prompt_length: maximum prompt tokens (tail-keeping truncation).
        alignment: names from :data:`mckd.data.alignment.KNOWN_ALIGNMENTS` (need a teacher).
        cache_dir: where the arrow cache goes (default :func:`default_cache_dir`).
        num_proc: worker processes for ``datasets.map``.
        limit: keep the first ``limit`` records (-1: all).

    Raises:
        FileNotFoundError / DataFormatError: bad file (file:line in the message), before caching.
        ValueError: bad arguments (unknown alignment name, alignment without a teacher, lengths).
    """
    from datasets import Dataset

    alignment = check_pipeline_options(student_tokenizer, teacher_tokenizer, alignment, max_length,
                                       max_prompt_length, "build_dataset")
    path = Path(path)
    examples = read_examples(path, limit=limit)  # validates everything before any cache write
    markers = al.feature_markers(student_tokenizer, teacher_tokenizer, alignment)
    key_parts = {
        "version": PIPELINE_VERSION, "file": _file_sha256(path), "limit": limit,
        "max_length": max_length, "max_prompt_length": max_prompt_length,
        "alignment": list(alignment), "markers": list(markers),
        "student": tokenizer_fingerprint(student_tokenizer),
        "teacher": tokenizer_fingerprint(teacher_tokenizer) if teacher_tokenizer else None,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"{path.stem}-{key}.arrow"

    raw = Dataset.from_dict({
        "prompt": [e.prompt for e in examples],
        "output": [e.outputs[0] for e in examples],
        "example_index": [e.index for e in examples],
    })
    fn = functools.partial(_process_batch, student_tokenizer=student_tokenizer,
                           teacher_tokenizer=teacher_tokenizer, max_prompt_length=max_prompt_length,
                           max_length=max_length, alignment=alignment, markers=markers)
    hf = raw.map(fn, batched=True, batch_size=64, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=raw.column_names, features=_features(teacher_tokenizer is not None,
                                                                     alignment),
                 cache_file_name=str(cache_file), new_fingerprint=key, load_from_cache_file=True,
                 desc=f"tokenising {path.name}")
    ds = DistillDataset(hf, n_read=len(examples), cache_file=str(cache_file),
                        has_teacher=teacher_tokenizer is not None, alignment=alignment)
    if ds.n_dropped:
        logger.warning("%s: dropped %d of %d examples whose response is truncated away entirely "
                       "(prompt fills max_length=%d)", path, ds.n_dropped, ds.n_read, max_length)
    logger.info("%s: %d training examples (cache %s)", path, len(ds), cache_file)
    if al.EXACT in alignment and len(ds):
        aligned, total = al.exact_alignment_share(hf["labels"], hf["exact_teacher_index"])
        ds.exact_share = aligned / max(total, 1)
        logger.info("%s: exact token alignment covers %d of %d student label positions (%.1f%%)",
                    path, aligned, total, 100.0 * ds.exact_share)
    return ds

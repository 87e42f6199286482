"""MinED vocabulary map: for every teacher token id, the student token id it is sent to.

The published code ships these maps as JSON files ``{"teacher_id": student_id}``
for ids ``0 .. len(teacher tokenizer) - 1`` but no script that builds them. The shipped
files agree with this rule, which :func:`build_vocab_map` implements:

1. Token strings come from ``convert_ids_to_tokens`` (byte-level "Ġ"/"Ċ" or SentencePiece "▁"
   notation, special and added tokens included).
2. If the teacher's and the student's vocabularies use different notations, teacher strings are
   rewritten into the student's notation first (:func:`to_student_notation`: "▁" <-> "Ġ",
   SentencePiece byte tokens ``<0xNN>`` <-> byte-level characters). The notation is read from the
   vocabulary itself (:func:`vocabulary_style`), never from tokenizer class names (the published
   class table raised KeyError on unknown classes). For two vocabularies of the same
   notation (Qwen -> GPT-2, Mistral -> TinyLLaMA) strings are compared as they are.
3. A teacher string present in the student vocabulary maps to that student id (exact match).
4. Otherwise it maps to the student token with the smallest Levenshtein distance over the whole
   student vocabulary, ties going to the *smallest student id*. This tie rule reproduces both
   reference files exactly (docs/mined.md gives the figures).
5. Special tokens: eos -> eos, bos -> bos, unk -> unk when both tokenizers define them; any other
   special token (e.g. Qwen ``<|im_start|>``) goes through rules 3-4 like an ordinary string, as in
   the reference (``<|im_start|>`` -> 14437 "ĠKickstarter").

Rule 4 runs as chunked ``rapidfuzz.process.cdist`` (C++, ``workers`` threads) plus ``argmin``:
about half a minute for Qwen (151,646 ids) -> GPT-2 on 2 cores.

CLI::

    python -m mckd.data.vocab_map --teacher <model dir> --student <model dir> --out <json> [--workers N]

(also installed as ``mckd-vocab-map``). The JSON is written atomically (temporary file + rename).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

BYTE_LEVEL = "byte_level"        # GPT-2 style: every byte is a printable character, "Ġ" = space
SENTENCEPIECE = "sentencepiece"  # "▁" = space, byte fallback tokens "<0xNN>"
PLAIN = "plain"                  # no recognised word marker: strings are compared as they are
SP_MARKER = "▁"
BL_MARKER = "Ġ"


# --------------------------------------------------------------------------- notations
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: byte value -> the printable character that stands for it.

    Printable Latin-1 bytes stand for themselves; the remaining 68 bytes (controls, space, ...)
    are shifted to code points 256, 257, ... in increasing byte order (so space 0x20 -> "Ġ").
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_B2U = byte_to_unicode()
_U2B = {u: b for b, u in _B2U.items()}


def vocabulary_style(tokens: Sequence[str]) -> str:
    """Decide a vocabulary's notation from its token strings.

    Byte-level when all 256 byte characters are single-character tokens and "Ġ" starts more
    tokens than "▁"; SentencePiece when "▁" starts at least 1% of the tokens and more than "Ġ";
    otherwise plain.

    Args:
        tokens: the vocabulary's token strings (index = id; ``None`` entries are ignored).
    """
    present = {t for t in tokens if t}
    n_bl = sum(1 for t in present if t.startswith(BL_MARKER))
    n_sp = sum(1 for t in present if t.startswith(SP_MARKER))
    if n_bl > n_sp and all(c in present for c in _B2U.values()):
        return BYTE_LEVEL
    if n_sp > n_bl and n_sp >= 0.01 * max(1, len(present)):
        return SENTENCEPIECE
    return PLAIN


def _sp_to_bytes(token: str) -> bytes:
    """SentencePiece string -> the bytes it stands for ("▁" = space, "<0xNN>" = one byte)."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace(SP_MARKER, " ").encode("utf-8")


def to_student_notation(token: str, teacher_style: str, student_style: str) -> str:
    """Rewrite one teacher token string into the student vocabulary's notation.

    Only notation changes: "▁" <-> "Ġ" (the word markers), SentencePiece byte tokens ``<0xNN>``
    <-> byte-level characters, and UTF-8 text <-> byte-level characters. Byte-level bytes that
    are not valid UTF-8 on their own (a piece of a multi-byte character) become ``<0xNN>`` tokens
    in SentencePiece notation, which is how such a vocabulary spells single bytes.

    Args:
        token: teacher token string.
        teacher_style / student_style: values of :func:`vocabulary_style`.
    """
    if teacher_style == student_style or PLAIN in (teacher_style, student_style):
        if teacher_style == PLAIN and student_style == SENTENCEPIECE:
            return token.replace(" ", SP_MARKER)
        return token
    if teacher_style == SENTENCEPIECE and student_style == BYTE_LEVEL:
        return "".join(_B2U[b] for b in _sp_to_bytes(token))
    # byte-level teacher -> SentencePiece student
    if any(c not in _U2B for c in token):       # not a byte-level string (e.g. an added token)
        return token
    raw = bytes(_U2B[c] for c in token)
    try:
        return raw.decode("utf-8").replace(" ", SP_MARKER)
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in raw)


# --------------------------------------------------------------------------- the map
def nearest_by_edit_distance(queries: Sequence[str], choices: Sequence[str], *, workers: int = 1,
                             chunk_size: int = 1024) -> np.ndarray:
    """Index of the choice with the smallest Levenshtein distance to each query.

    Ties go to the smallest index (``argmin`` returns the first minimum).

    Args:
        queries: M strings.
        choices: N strings (the student vocabulary).
        workers: threads for rapidfuzz (-1 = all cores).
        chunk_size: queries per ``cdist`` call; memory is ``chunk_size * N * 4`` bytes.

    Returns:
        (M,) int64 indices into ``choices``.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    out = np.empty(len(queries), dtype=np.int64)
    for lo in range(0, len(queries), chunk_size):
        dist = process.cdist(queries[lo:lo + chunk_size], choices, scorer=Levenshtein.distance,
                             dtype=np.int32, workers=workers)  # (chunk, N)
        out[lo:lo + chunk_size] = dist.argmin(axis=1)
    return out


def build_vocab_map(teacher_tokens: Sequence[str], student_tokens: Sequence[str], *,
                    special_pairs: Sequence[tuple[int, int]] = (), workers: int = 1,
                    chunk_size: int = 1024) -> list[int]:
    """Teacher id -> student id for every teacher id (rules 2-5 of the module docstring).

    Args:
        teacher_tokens: V_t' teacher token strings, index = teacher id.
        student_tokens: V_s' student token strings, index = student id.
        special_pairs: (teacher id, student id) pairs fixed in advance (eos -> eos, ...).
        workers: rapidfuzz threads for the edit-distance search.
        chunk_size: queries per ``cdist`` call.

    Returns:
        list of V_t' student ids.
    """
    if not student_tokens:
        raise ValueError("build_vocab_map: the student vocabulary is empty")
    t_style, s_style = vocabulary_style(teacher_tokens), vocabulary_style(student_tokens)
    logger.info("vocabulary notations: teacher %s, student %s", t_style, s_style)
    fixed = {int(t): int(s) for t, s in special_pairs}
    student_index: dict[str, int] = {}
    for i, tok in enumerate(student_tokens):
        if tok is not None:
            student_index.setdefault(tok, i)  # first (smallest) id wins on duplicate strings
    choices = [tok if tok is not None else "" for tok in student_tokens]

    mapping = [-1] * len(teacher_tokens)
    pending_ids, pending_strings = [], []
    for t_id, tok in enumerate(teacher_tokens):
        if t_id in fixed:
            mapping[t_id] = fixed[t_id]
            continue
        norm = to_student_notation(tok or "", t_style, s_style)
        s_id = student_index.get(norm)
        if s_id is not None:
            mapping[t_id] = s_id
        else:
            pending_ids.append(t_id)
            pending_strings.append(norm)
    logger.info("vocab map: %d exact matches, %d by minimum edit distance",
                len(mapping) - len(pending_ids), len(pending_ids))
    if pending_ids:
        nearest = nearest_by_edit_distance(pending_strings, choices, workers=workers,
                                           chunk_size=chunk_size)
        for t_id, s_id in zip(pending_ids, nearest.tolist()):
            mapping[t_id] = s_id
    return mapping


def special_token_pairs(teacher_tokenizer, student_tokenizer) -> list[tuple[int, int]]:
    """(teacher id, student id) for eos, bos and unk when both tokenizers define that role."""
    pairs = []
    for role in ("eos_token_id", "bos_token_id", "unk_token_id"):
        t_id, s_id = getattr(teacher_tokenizer, role, None), getattr(student_tokenizer, role, None)
        if t_id is not None and s_id is not None:
            pairs.append((int(t_id), int(s_id)))
    return pairs


def vocabulary_tokens(tokenizer) -> list[str]:
    """Token strings of ids ``0 .. len(tokenizer) - 1`` (added and special tokens included)."""
    return [t if t is not None else "" for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]


def build_vocab_map_for_tokenizers(teacher_tokenizer, student_tokenizer, *, workers: int = 1) -> list[int]:
    """:func:`build_vocab_map` on two loaded tokenizers, special tokens included."""
    return build_vocab_map(vocabulary_tokens(teacher_tokenizer), vocabulary_tokens(student_tokenizer),
                           special_pairs=special_token_pairs(teacher_tokenizer, student_tokenizer),
                           workers=workers)


# --------------------------------------------------------------------------- files
def save_vocab_map(mapping: Sequence[int], path: str | os.PathLike) -> Path:
    """Write ``{"teacher_id": student_id}`` atomically (temporary file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({str(i): int(s) for i, s in enumerate(mapping)}, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_vocab_map(path: str | os.PathLike) -> list[int]:
    """Read a ``{"teacher_id": student_id}`` JSON file; keys must be exactly ``0 .. n-1``.

    The published loader assumed this silently; here a gap or a non-integer
    value is an error naming the file.
    """
    from mckd.data.examples import DataFormatError

    try:
        raw = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DataFormatError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f"{path}: expected a non-empty JSON object {{teacher_id: student_id}}")
    try:
        items = {int(k): int(v) for k, v in raw.items()}
    except (TypeError, ValueError) as e:
        raise DataFormatError(f"{path}: keys and values must be integers ({e})") from None
    n = len(items)
    if set(items) != set(range(n)):
        missing = sorted(set(range(n)) - set(items))[:5]
        raise DataFormatError(f"{path}: teacher ids must be exactly 0..{n - 1}; missing e.g. {missing}")
    return [items[i] for i in range(n)]


def vocabulary_fingerprint(teacher_tokens: Sequence[str], student_tokens: Sequence[str]) -> str:
    """Short hash of both vocabularies: the cache key of a built map."""
    h = hashlib.sha256()
    for toks in (teacher_tokens, student_tokens):
        h.update(("\x00".join(toks)).encode("utf-8"))
        h.update(b"\x01")
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$MCKD_CACHE_DIR/vocab_maps`` or ``~/.cache/mckd/vocab_maps``."""
    base = os.environ.get("MCKD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mckd")
    return Path(base) / "vocab_maps"


def load_or_build_vocab_map(path: str | os.PathLike | None, teacher_tokenizer, student_tokenizer, *,
                            cache_dir: str | os.PathLike | None = None, workers: int = -1) -> tuple[list[int], Path]:
    """The map the criterion uses: read ``path`` if it exists, else build it and cache it.

    Args:
        path: ``--teacher-to-student-id-mapping`` (may be None). When given but missing, the built
            map is written there.
        teacher_tokenizer / student_tokenizer: loaded tokenizers.
        cache_dir: where a map without ``path`` is cached (default :func:`default_cache_dir`),
            under a name derived from both vocabularies (a changed vocabulary gets a new map).
        workers: rapidfuzz threads when building (-1 = all cores).

    Returns:
        ``(mapping, file it was read from or written to)``.
    """
    if path is not None and Path(path).is_file():
        logger.info("MinED vocabulary map: reading %s", path)
        return load_vocab_map(path), Path(path)
    t_tokens, s_tokens = vocabulary_tokens(teacher_tokenizer), vocabulary_tokens(student_tokenizer)
    if path is None:
        key = vocabulary_fingerprint(t_tokens, s_tokens)
        path = Path(cache_dir or default_cache_dir()) / f"tea2stu_id_mapping.{key}.json"
        if path.is_file():
            logger.info("MinED vocabulary map: using cached %s", path)
            return load_vocab_map(path), path
    logger.info("MinED vocabulary map: building %s (teacher %d ids, student %d ids)",
                path, len(t_tokens), len(s_tokens))
    start = time.perf_counter()
    mapping = build_vocab_map(t_tokens, s_tokens,
                              special_pairs=special_token_pairs(teacher_tokenizer, student_tokenizer),
                              workers=workers)
    save_vocab_map(mapping, path)
    logger.info("MinED vocabulary map: built in %.1f s, written to %s", time.perf_counter() - start, path)
    return mapping, Path(path)


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 2 with a one-line message on bad input (see :mod:`mckd.cli`)."""
    from mckd.cli import run_main

    return run_main("mckd-vocab-map", _main, argv)


def _main(argv: list[str]) -> int:
    from mckd.cli import ArgumentParser, UsageError

    parser = ArgumentParser(
        prog="mckd-vocab-map",
        description="Build the MinED teacher->student token-id map (JSON {teacher_id: student_id}).")
    parser.add_argument("--teacher", required=True, help="teacher model (or tokenizer) directory")
    parser.add_argument("--student", required=True, help="student model (or tokenizer) directory")
    parser.add_argument("--out", required=True, help="output JSON path (written atomically)")
    parser.add_argument("--workers", type=int, default=-1,
                        help="threads for the edit-distance search (-1 = all cores)")
    args = parser.parse_args(argv)
    if args.workers == 0 or args.workers < -1:
        raise UsageError(f"--workers: must be -1 (all cores) or positive (got {args.workers})")
    out_parent = next((q for q in Path(args.out).absolute().parents if q.exists()), None)
    if Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} is a directory; give a file name")
    if out_parent is None or not out_parent.is_dir() or not os.access(out_parent, os.W_OK):
        raise UsageError(f"--out: {args.out} cannot be written ({out_parent} is not a writable directory)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mckd.models.tokenizers import load_tokenizer

    teacher = load_tokenizer(args.teacher, what="teacher (--teacher)")
    student = load_tokenizer(args.student, what="student (--student)")
    start = time.perf_counter()
    mapping = build_vocab_map_for_tokenizers(teacher, student, workers=args.workers)
    out = save_vocab_map(mapping, args.out)
    print(f"wrote {out}: {len(mapping)} teacher ids -> {len(set(mapping))} distinct student ids "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

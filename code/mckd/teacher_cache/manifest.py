"""The cache directory's manifest: what was stored, from which teacher, data and settings.

Layout of a cache directory::

    manifest.json                      this manifest (written atomically; ``complete`` once built)
    teacher/                           the teacher's config.json and tokenizer files (no weights)
    teacher_weights.safetensors        embed_tokens.weight, lm_head.weight (when stored)
    shards/shard-00000.safetensors     per-example teacher outputs (see mckd.teacher_cache.shards)

The fingerprint identifies what the stored tensors depend on. A build that finds a manifest with
another fingerprint in its output directory refuses to continue; a training run compares the
fields it can know (teacher weights and tokenizer when ``--teacher-model-path`` is given, the
data file, the lengths, the pipeline and format versions) and refuses a stale or foreign cache.
Both errors name every field that differs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mckd.config import ConfigError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEACHER_DIR = "teacher"
WEIGHTS_FILE = "teacher_weights.safetensors"
SHARD_DIR = "shards"
CONTENTS = ("logits", "hidden", "embed_tokens", "lm_head")
# weight files of a Hugging Face model or PEFT adapter directory (plus the config: the architecture
# changes the outputs as much as the weights do)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_EXTRA = ("config.json", "adapter_config.json")
# fields a training run can check against the cache (the others describe how it was built)
TRAINING_FIELDS = ("format_version", "pipeline_version", "teacher_weights", "teacher_tokenizer",
                   "data_file", "max_length", "max_prompt_length")


class TeacherCacheError(ConfigError):
    """A teacher cache that cannot be used; the message names the directory and what is wrong."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model_path: str, peft_path: str | None = None) -> str:
    """sha256 over the weight files and config of the teacher directory (and of its LoRA adapter):
    the name, size and content hash of every ``*.safetensors``/``*.bin``/``*.pt`` file and of
    ``config.json``/``adapter_config.json``, in name order. Reads every byte once."""
    h = hashlib.sha256()
    for label, d in (("model", model_path), ("adapter", peft_path)):
        if d is None:
            continue
        files = sorted(p for p in Path(d).iterdir() if p.is_file() and (
            p.suffix in _WEIGHT_SUFFIXES or p.name in _WEIGHT_EXTRA))
        if label == "model" and not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
            raise TeacherCacheError(f"--teacher-model-path: {d} holds no weight files "
                                    f"({', '.join(_WEIGHT_SUFFIXES)})")
        for p in files:
            h.update(f"{label}/{p.name}:{p.stat().st_size}:{file_sha256(p)}\n".encode())
    return h.hexdigest()


def make_fingerprint(*, teacher_weights: str, teacher_tokenizer: str, data_file: str,
                     max_length: int, max_prompt_length: int, top_k: int, dtype: str,
                     teacher_dtype: str, store: list[str], limit: int) -> dict:
    """The fingerprint dict stored in the manifest (every value a str, int or list)."""
    from mckd.data.dataset import PIPELINE_VERSION

    return {"format_version": FORMAT_VERSION, "pipeline_version": PIPELINE_VERSION,
            "teacher_weights": teacher_weights, "teacher_tokenizer": teacher_tokenizer,
            "data_file": data_file, "max_length": int(max_length),
            "max_prompt_length": int(max_prompt_length), "top_k": int(top_k), "dtype": dtype,
            "teacher_dtype": teacher_dtype, "store": list(store), "limit": int(limit)}


def differences(cached: dict, wanted: dict, fields=None) -> list[str]:
    """``"field: cache <a>, this run <b>"`` for every field of ``fields`` (default: all of
    ``wanted``) whose values differ. Hashes are shortened to 12 characters."""
    def show(v):
        return v[:12] if isinstance(v, str) and len(v) == 64 else v

    out = []
    for k in (fields or wanted):
        if k in wanted and cached.get(k) != wanted[k]:
            out.append(f"{k}: cache {show(cached.get(k))!r}, this run {show(wanted[k])!r}")
    return out


def read_manifest(directory: str | os.PathLike, *, flag: str = "--teacher-cache") -> dict:
    """The manifest of a cache directory; errors name the flag and the path."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise TeacherCacheError(f"{flag}: {directory} is not a directory")
    if not path.is_file():
        raise TeacherCacheError(f"{flag}: {directory} has no {MANIFEST} (not a teacher cache; "
                                "build one with python -m mckd.teacher_cache build)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TeacherCacheError(f"{flag}: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    version = manifest.get("fingerprint", {}).get("format_version")
    if version != FORMAT_VERSION:
        raise TeacherCacheError(f"{flag}: {path} has format version {version!r}; this code reads "
                                f"version {FORMAT_VERSION}: rebuild the cache")
    return manifest


def write_manifest(directory: str | os.PathLike, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (tmp file + ``os.replace``)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)

"""Build the embedded default: generated data, two trained tokenizers, three tiny models.

Usage::

    python -m mckd.tiny.build                      # data/tiny/ and model_hub/tiny/ of the repository
    python -m mckd.tiny.build --out /tmp/tiny      # /tmp/tiny/data/tiny/ and /tmp/tiny/model_hub/tiny/
    python -m mckd.tiny.build --train-size 2000 --seed 7 --force

Layout written (everything deterministic given the options)::

    <data-dir>/{train,dev,test,valid}.jsonl    the student's data; valid.jsonl = test.jsonl (the
                                               published eval reads it); train.jsonl is the first
                                               --train-size records of the teacher's corpus
    <data-dir>/teacher/{train,dev}.jsonl       the teacher's corpus (--teacher-train-size records)
    <model-dir>/tokenizers/{student,teacher}/  byte-level BPE / Llama-style BPE, fast HF tokenizers
    <model-dir>/student/                       GPT-2-style, student tokenizer
    <model-dir>/teacher/                       Qwen2-style, teacher tokenizer (cross-vocabulary pair)
    <model-dir>/teacher_same_vocab/            GPT-2-style, student tokenizer (same-vocabulary pair)
    <model-dir>/manifest.json                  the options used and the parameter counts

A second call with the same options finds ``manifest.json`` and does nothing (``--force`` rebuilds).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

from mckd.tiny.build_models import DEFAULT_SIZES, build_models
from mckd.tiny.tasks import DEFAULT_SPLITS, FAMILIES, STUDENT_TRAIN, generate_splits, training_record
from mckd.tiny.train_tokenizers import corpus, train_byte_level_bpe, train_llama_style_bpe

logger = logging.getLogger(__name__)
MANIFEST_VERSION = 2
STUDENT_VOCAB, TEACHER_VOCAB = 1024, 2048


def repo_root() -> Path:
    """The repository root when running from a checkout (code/mckd/tiny -> root), else the cwd."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "scripts").is_dir() and (root / "code").is_dir() else Path.cwd()


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def build(data_dir: str | Path, model_dir: str | Path, *, seed: int = 1234,
          sizes: dict[str, int] | None = None, student_vocab: int = STUDENT_VOCAB,
          teacher_vocab: int = TEACHER_VOCAB, force: bool = False) -> dict:
    """Build (or find up to date) the whole embedded default and return its manifest.

    Args:
        data_dir: where the jsonl splits go.
        model_dir: where tokenizers, models and ``manifest.json`` go.
        seed: seed of data generation and model initialisation.
        sizes: records per split: ``teacher_train`` (the teacher's corpus), ``train`` (the
            student's training set, a prefix of the teacher's corpus), ``dev``, ``test``
            (defaults: :data:`DEFAULT_SPLITS`, :data:`STUDENT_TRAIN`).
        student_vocab: vocabulary size of the byte-level BPE.
        teacher_vocab: vocabulary size of the Llama-style BPE.
        force: rebuild even when an identical manifest exists.
    """
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    sizes = {**DEFAULT_SPLITS, "train": STUDENT_TRAIN, **(sizes or {})}
    if set(sizes) != {"teacher_train", "train", "dev", "test"} or min(sizes.values()) < 1:
        raise ValueError(f"sizes must give teacher_train/train/dev/test counts >= 1, got {sizes}")
    if sizes["train"] > sizes["teacher_train"]:
        raise ValueError(f"the student's train split ({sizes['train']}) must be a subset of the "
                         f"teacher's corpus ({sizes['teacher_train']})")
    options = {"version": MANIFEST_VERSION, "seed": seed, "splits": sizes,
               "student_vocab": student_vocab, "teacher_vocab": teacher_vocab,
               "families": sorted(FAMILIES),
               "model_sizes": {k: vars(v) for k, v in DEFAULT_SIZES.items()}}
    manifest_path = model_dir / "manifest.json"
    if not force and manifest_path.is_file() and (data_dir / "valid.jsonl").is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("options") == options:
            logger.info("embedded default up to date in %s and %s", data_dir, model_dir)
            return old
    t0 = time.time()
    splits = generate_splits({k: sizes[k] for k in ("teacher_train", "dev", "test")}, seed=seed)
    teacher_train = [training_record(r) for r in splits["teacher_train"]]
    write_jsonl(teacher_train, data_dir / "teacher" / "train.jsonl")
    write_jsonl(splits["dev"], data_dir / "teacher" / "dev.jsonl")
    write_jsonl(teacher_train[: sizes["train"]], data_dir / "train.jsonl")
    for name in ("dev", "test"):
        write_jsonl(splits[name], data_dir / f"{name}.jsonl")
    shutil.copyfile(data_dir / "test.jsonl", data_dir / "valid.jsonl")

    texts = corpus(teacher_train)
    student_tok = train_byte_level_bpe(texts, model_dir / "tokenizers" / "student", vocab_size=student_vocab)
    teacher_tok = train_llama_style_bpe(texts, model_dir / "tokenizers" / "teacher", vocab_size=teacher_vocab)
    params = build_models(student_tok, teacher_tok, model_dir, seed=seed)

    manifest = {"options": options, "parameters": params,
                "records": {**{k: len(v) for k, v in splits.items()}, "train": sizes["train"]}}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("built the embedded default in %.1fs: %s", time.time() - t0, params)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mckd.tiny.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=str, default=None,
                        help="base directory: data goes to <out>/data/tiny, models to <out>/model_hub/tiny "
                             "(default: the repository root)")
    parser.add_argument("--data-dir", type=str, default=None, help="override the data directory")
    parser.add_argument("--model-dir", type=str, default=None, help="override the model directory")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--teacher-train-size", type=int, default=DEFAULT_SPLITS["teacher_train"],
                        help="records of the teacher's corpus")
    parser.add_argument("--train-size", type=int, default=STUDENT_TRAIN,
                        help="records of the student's training set (the first of the teacher's corpus)")
    parser.add_argument("--dev-size", type=int, default=DEFAULT_SPLITS["dev"])
    parser.add_argument("--test-size", type=int, default=DEFAULT_SPLITS["test"])
    parser.add_argument("--student-vocab", type=int, default=STUDENT_VOCAB)
    parser.add_argument("--teacher-vocab", type=int, default=TEACHER_VOCAB)
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    base = Path(args.out) if args.out else repo_root()
    manifest = build(args.data_dir or base / "data" / "tiny", args.model_dir or base / "model_hub" / "tiny",
                     seed=args.seed, force=args.force,
                     sizes={"teacher_train": args.teacher_train_size, "train": args.train_size,
                            "dev": args.dev_size, "test": args.test_size},
                     student_vocab=args.student_vocab, teacher_vocab=args.teacher_vocab)
    print(json.dumps(manifest["parameters"]))


if __name__ == "__main__":
    main()

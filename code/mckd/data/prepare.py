"""Build the processed jsonl sets (rendered prompt, output, splits) from a raw public dataset.

Usage::

    # from a local copy of databricks-dolly-15k (offline)
    python -m mckd.data.prepare dolly --raw databricks-dolly-15k.jsonl --out data/dolly \\
        --dev-size 1000 --valid-size 500 --seed 1234
    # from the Hugging Face hub by name (needs network; the only place the project downloads data)
    python -m mckd.data.prepare dolly --raw databricks/databricks-dolly-15k --out data/dolly
    # optional: drop examples whose rendered prompt is longer than 256 GPT-2 tokens, as the
    # published sets evidently were
    python -m mckd.data.prepare dolly --raw ... --out data/dolly \\
        --tokenizer model_hub/gpt2/gpt2-base --max-prompt-tokens 256

Writes ``train.jsonl``, ``dev.jsonl`` (in-training validation), ``valid.jsonl`` (final test set) and
``prepare_info.json`` (arguments, counts, sha256 of the raw file) into ``--out``. Each record has
``instruction``, ``input``, ``output``, ``prompt`` (rendered with the published Alpaca template,
:func:`mckd.data.examples.render_prompt`) and ``topic`` (the Dolly category). Existing files are
never overwritten unless ``--overwrite`` is given.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from pathlib import Path

from mckd.data.examples import DataFormatError, decode_line, render_prompt

logger = logging.getLogger(__name__)
SPLITS = ("train", "dev", "valid")


def read_raw_records(raw: str) -> tuple[list[dict], str]:
    """Raw records from a local jsonl/json file or (when ``raw`` is not a file) a hub dataset name.

    Returns:
        (records, provenance): provenance is the file's sha256 or ``hub:<name>``.
    """
    path = Path(raw)
    if path.is_file():
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            decode_line(data[data.rfind(b"\n", 0, e.start) + 1:].split(b"\n", 1)[0], f"{path}:{line}")
            raise  # not reached: decode_line raises for the same bytes
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        else:
            records = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        return records, "sha256:" + hashlib.sha256(data).hexdigest()
    if path.suffix in (".json", ".jsonl") or path.exists():
        raise FileNotFoundError(f"raw data file {path} does not exist")
    from datasets import load_dataset  # a hub name: needs network

    logger.info("loading %s from the Hugging Face hub", raw)
    return [dict(r) for r in load_dataset(raw, split="train")], f"hub:{raw}"


def dolly_record(rec: dict, where: str) -> dict | None:
    """Convert one databricks-dolly-15k record (instruction/context/response/category).

    Returns None for records with an empty instruction or response (skipped, counted).
    """
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: expected a JSON object")
    missing = [k for k in ("instruction", "response") if k not in rec]
    if missing:
        raise DataFormatError(f"{where}: missing field(s) {missing} (expected the "
                              "databricks-dolly-15k schema: instruction, context, response, category)")
    instruction = str(rec["instruction"] or "").strip()
    context = str(rec.get("context") or "").strip()
    response = str(rec["response"] or "").strip()
    if not instruction or not response:
        return None
    return {"instruction": instruction, "input": context, "output": response,
            "prompt": render_prompt(instruction, context), "topic": rec.get("category", "")}


def split_records(records: list[dict], *, dev_size: int, valid_size: int, seed: int) -> dict:
    """Shuffle with ``seed`` and cut ``valid`` (first), ``dev`` (next), ``train`` (the rest)."""
    if dev_size < 0 or valid_size < 0 or dev_size + valid_size >= len(records):
        raise ValueError(f"--dev-size {dev_size} + --valid-size {valid_size} must be non-negative and "
                         f"leave training records (have {len(records)})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    return {"valid": shuffled[:valid_size], "dev": shuffled[valid_size:valid_size + dev_size],
            "train": shuffled[valid_size + dev_size:]}


def prepare_dolly(raw: str, out: str | Path, *, dev_size: int = 1000, valid_size: int = 500,
                  seed: int = 1234, tokenizer_path: str | None = None, max_prompt_tokens: int = -1,
                  overwrite: bool = False) -> dict:
    """Build ``out/{train,dev,valid}.jsonl`` from databricks-dolly-15k. Returns the info dict."""
    out = Path(out)
    targets = [out / f"{s}.jsonl" for s in SPLITS]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing} exist; pass --overwrite to replace them")
    records, provenance = read_raw_records(raw)
    converted, skipped_empty = [], 0
    for i, rec in enumerate(records, start=1):
        r = dolly_record(rec, f"{raw}:{i}")
        if r is None:
            skipped_empty += 1
        else:
            converted.append(r)
    skipped_long = 0
    if max_prompt_tokens > 0:
        if not tokenizer_path:
            raise ValueError("--max-prompt-tokens needs --tokenizer")
        from mckd.models.tokenizers import load_tokenizer

        tok = load_tokenizer(tokenizer_path, what="length-filter")
        lens = [len(x) for x in tok([r["prompt"] for r in converted], add_special_tokens=False)["input_ids"]]
        kept = [r for r, n in zip(converted, lens) if n <= max_prompt_tokens]
        skipped_long, converted = len(converted) - len(kept), kept
    splits = split_records(converted, dev_size=dev_size, valid_size=valid_size, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    info = {"dataset": "dolly", "raw": str(raw), "raw_provenance": provenance, "seed": seed,
            "dev_size": dev_size, "valid_size": valid_size, "max_prompt_tokens": max_prompt_tokens,
            "tokenizer": tokenizer_path, "raw_records": len(records),
            "skipped_empty": skipped_empty, "skipped_long_prompt": skipped_long,
            "counts": {k: len(v) for k, v in splits.items()}}
    (out / "prepare_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    """Exit status 2 with a one-line message on bad input (see :mod:`mckd.cli`)."""
    from mckd.cli import run_main

    return run_main("python -m mckd.data.prepare", _main, argv)


def _main(argv: list[str]) -> int:
    from mckd.cli import ArgumentParser, UsageError

    ap = ArgumentParser(prog="python -m mckd.data.prepare",
                        description="Build processed jsonl sets from raw public datasets.")
    sub = ap.add_subparsers(dest="dataset", required=True, parser_class=ArgumentParser)
    d = sub.add_parser("dolly", help="databricks-dolly-15k -> train/dev/valid jsonl")
    d.add_argument("--raw", required=True,
                   help="local databricks-dolly-15k.jsonl, or a hub name such as "
                        "databricks/databricks-dolly-15k (needs network)")
    d.add_argument("--out", required=True, help="output directory, e.g. data/dolly")
    d.add_argument("--dev-size", type=int, default=1000)
    d.add_argument("--valid-size", type=int, default=500)
    d.add_argument("--seed", type=int, default=1234)
    d.add_argument("--tokenizer", default=None, help="local tokenizer for --max-prompt-tokens")
    d.add_argument("--max-prompt-tokens", type=int, default=-1,
                   help="drop examples whose rendered prompt is longer (-1: keep all)")
    d.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.dev_size < 0 or args.valid_size < 0:
        raise UsageError(f"--dev-size/--valid-size must be >= 0 (got {args.dev_size}, {args.valid_size})")
    if args.max_prompt_tokens > 0 and not args.tokenizer:
        raise UsageError("--max-prompt-tokens needs --tokenizer")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    try:
        info = prepare_dolly(args.raw, args.out, dev_size=args.dev_size, valid_size=args.valid_size,
                             seed=args.seed, tokenizer_path=args.tokenizer,
                             max_prompt_tokens=args.max_prompt_tokens, overwrite=args.overwrite)
    except ValueError as e:  # split sizes that do not fit the data
        raise UsageError(str(e)) from None
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

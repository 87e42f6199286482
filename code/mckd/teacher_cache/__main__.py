"""Command line of the teacher cache: ``build``, ``verify``, ``info``.

Launch commands (from the repository root, with ``PYTHONPATH=code``)::

    # CPU or one GPU
    python -m mckd.teacher_cache build --teacher-model-path outputs/qwen/.../epoch10_step... \
        --data-dir data/dolly --output outputs/teacher_cache/qwen1.5-1.8b-dolly \
        --max-length 512 --max-prompt-length 256 --top-k 1024 --dtype bf16

    # several GPUs: each rank writes its own shards; rerun the same command to resume
    torchrun --nproc_per_node 4 -m mckd.teacher_cache build ...same flags...

    python -m mckd.teacher_cache verify DIR     # sizes and sha256 of every shard
    python -m mckd.teacher_cache info DIR       # the manifest, summarised

Train from a cache with ``code/distillation.py ... --teacher-cache DIR`` (see docs/teacher_cache.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_TOP_K = 1024  # docs/teacher_cache.md: covers MCW-KD's 400 ranks; KL terms within ~5e-4 at tau 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mckd.teacher_cache", allow_abbrev=False,
                                description="Offline teacher cache: build, verify, info.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the teacher once over the training file and store its outputs",
                       allow_abbrev=False)
    b.add_argument("--teacher-model-path", required=True, help="teacher HF directory")
    b.add_argument("--teacher-peft-path", help="teacher LoRA adapter (merged at load)")
    b.add_argument("--data-dir", required=True, help="directory with train.jsonl (the training file)")
    b.add_argument("--output", required=True, help="cache directory (created; resumed when it holds "
                                                   "a partial build of the same inputs)")
    b.add_argument("--max-length", type=int, default=512, help="the training run's --max-length")
    b.add_argument("--max-prompt-length", type=int, default=256, help="the training run's --max-prompt-length")
    b.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help="logits kept per position (the rest is kept as one tail log-mass); >= the "
                        "vocabulary size stores every logit")
    b.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="storage dtype of logits, hidden states and teacher weights")
    b.add_argument("--teacher-dtype", choices=("bf16", "fp16", "fp32"),
                   help="dtype the teacher runs in (default: --dtype); use the training --precision")
    b.add_argument("--store", default="logits,hidden,embed_tokens,lm_head",
                   help="comma list of what to store: logits (always), hidden (last-layer hidden "
                        "states), embed_tokens / lm_head (the teacher's embedding table and output "
                        "head, once; DSKD, DSKD-CMA and MCW-KD read them)")
    b.add_argument("--batch-size", type=int, default=8, help="teacher forward batch per process")
    b.add_argument("--shard-size", type=int, default=256, help="examples per shard")
    b.add_argument("--limit", type=int, default=-1, help="first N records of train.jsonl (-1: all)")
    b.add_argument("--device", help="torch device (default: this rank's GPU, else CPU)")
    b.add_argument("--overwrite", action="store_true", help="replace a cache of other inputs in --output")
    for name in ("verify", "info"):
        s = sub.add_parser(name, allow_abbrev=False)
        s.add_argument("directory")
    return p


def main(argv: list[str] | None = None) -> int:
    from mckd import dist
    from mckd.teacher_cache.manifest import TeacherCacheError

    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.addFilter(dist.RankZeroFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    try:
        if args.command == "build":
            from mckd.teacher_cache.build import build_cache

            dist.init_distributed()
            try:
                m = build_cache(teacher_model_path=args.teacher_model_path, teacher_peft_path=args.teacher_peft_path,
                                output=args.output, data_file=str(Path(args.data_dir) / "train.jsonl"),
                                max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                top_k=args.top_k, dtype=args.dtype, teacher_dtype=args.teacher_dtype,
                                store=tuple(s for s in args.store.split(",") if s), batch_size=args.batch_size,
                                shard_size=args.shard_size, limit=args.limit, overwrite=args.overwrite,
                                device=args.device)
            finally:
                dist.cleanup()
            if dist.is_main():
                print(json.dumps({k: m[k] for k in ("n_examples", "n_shards", "complete")}))
        elif args.command == "verify":
            from mckd.teacher_cache.shards import verify_cache

            n = verify_cache(args.directory)
            print(f"{args.directory}: {n} shards verified (sizes and sha256)")
        else:
            from mckd.teacher_cache.manifest import read_manifest

            m = read_manifest(args.directory, flag="info")
            summary = {k: m.get(k) for k in ("complete", "n_examples", "n_shards", "shard_size", "teacher")}
            summary["fingerprint"] = m["fingerprint"]
            summary["bytes"] = sum(s["bytes"] for s in m.get("shards", []))
            print(json.dumps(summary, indent=1))
    except TeacherCacheError as e:
        print(f"mckd.teacher_cache: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

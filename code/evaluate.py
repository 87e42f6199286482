"""Evaluate checkpoints with the published ROUGE-L protocol, aggregate and compare results.

Commands (from the repository root)::

    # one process (CPU or one GPU)
    python code/evaluate.py run --ckpt outputs/gpt2/.../epoch20_step4000 --eval-batch-size 32
    # several GPUs: every example is generated exactly once, gathered on rank 0
    torchrun --nproc_per_node 4 code/evaluate.py run --ckpt CKPT --eval-batch-size 32
    # a LoRA adapter (base model from --base-model-path, $MODEL_PATH, or adapter_config.json)
    python code/evaluate.py run --ckpt outputs/tinyllama/.../epoch10_step900 --eval-batch-size 16
    # re-aggregate an eval directory; build the paper-style table from several runs
    python code/evaluate.py aggregate CKPT/eval
    python code/evaluate.py compare RUN_A RUN_B --names SFT MCW-KD --out results/table

Protocol defaults (as published): datasets dolly self-inst vicuna sinst/11_ dialogsum, seeds 10-50,
prompts <= 256 tokens, 256 new tokens, sampling with top-p 1.0, top-k 0, temperature 1.0,
no_repeat_ngram_size 6. ``--greedy`` decodes greedily (one pair per dataset). The usual entry is
``scripts/eval/run_eval.sh CKPT BATCH``; see docs/evaluation.md. Exit status 2 with a one-line
message on bad input (``--debug`` or ``MCKD_DEBUG=1`` adds the traceback). A training checkpoint is
pinned while it is evaluated: the training run's pruning leaves it alone.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

from mckd.cli import ArgumentParser, UsageError, run_main  # noqa: E402
from mckd.config import finite_float  # noqa: E402
from mckd.evaluation.runner import DEFAULT_DATASETS, DEFAULT_SEEDS, EvalConfig  # noqa: E402

COMMANDS = ("run", "aggregate", "compare")


def _limit_pair(text: str) -> tuple[str, int]:
    name, sep, num = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--dataset-limit {text!r}: expected DATASET=N, e.g. uinst/11_=10000")
    try:
        return name, int(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dataset-limit {text!r}: N must be an integer") from None


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    r = sub.add_parser("run", help="generate and score (dataset, seed) pairs", allow_abbrev=False)
    r.add_argument("--ckpt", required=True, help="checkpoint directory: full HF model or LoRA adapter")
    r.add_argument("--base-model-path", default=None,
                   help="base model of a LoRA adapter (default: $MODEL_PATH, then adapter_config.json)")
    r.add_argument("--data-dir", default=str(ROOT / "data"), help="folder holding <dataset>/valid.jsonl")
    r.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    r.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    r.add_argument("--out-dir", default=None, help="default <ckpt>/eval (greedy: <ckpt>/eval-greedy)")
    r.add_argument("--eval-batch-size", type=int, default=32, help="prompts per generate() call and process")
    r.add_argument("--max-prompt-length", type=int, default=256)
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--max-length", type=int, default=None,
                   help="published form: max_new_tokens = max_length - max_prompt_length")
    r.add_argument("--greedy", action="store_true", help="greedy decoding (one pair per dataset)")
    r.add_argument("--top-p", type=finite_float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--temperature", type=finite_float, default=1.0)
    r.add_argument("--no-repeat-ngram-size", type=int, default=6)
    r.add_argument("--dev-num", type=int, default=-1, help="evaluate the first N examples of each set (-1: all)")
    r.add_argument("--dataset-limit", type=_limit_pair, action="append", default=[],
                   help="per-dataset cap DATASET=N (the published scripts cap uinst/11_ at 10000)")
    r.add_argument("--no-lm-loss", action="store_true", help="skip the teacher-forced loss on the reference")
    r.add_argument("--overwrite", action="store_true", help="redo pairs that are already finished")
    r.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16, fp16")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))

    a = sub.add_parser("aggregate", help="rebuild results.json/results.md of an eval directory")
    a.add_argument("eval_dir")

    c = sub.add_parser("compare", help="paper-style table from several runs (markdown + CSV)")
    c.add_argument("runs", nargs="+", help="checkpoints, eval directories or results.json files")
    c.add_argument("--names", nargs="+", default=None, help="row labels (default: distinct path suffixes)")
    c.add_argument("--metric", default="rougeL", choices=("rougeL", "exact_match", "avg_gen_len"))
    c.add_argument("--datasets", nargs="+", default=None, help="columns (default: all seen, paper order)")
    c.add_argument("--out", default=None, help="write <out>.md and <out>.csv (default: print markdown)")
    for sp in (r, a, c):
        sp.add_argument("--log-level", default="INFO")
    return p


def _need(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise UsageError(f"{flag}: {msg}")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Validate the ``run`` flags (before anything is loaded or written) and build the config."""
    max_new = args.max_new_tokens
    if args.max_length is not None:
        max_new = args.max_length - args.max_prompt_length
        _need(max_new > 0, "--max-length",
              f"{args.max_length} must exceed --max-prompt-length {args.max_prompt_length}")
    for name in ("eval_batch_size", "max_prompt_length", "max_new_tokens"):
        _need(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", f"must be >= 1 (got {getattr(args, name)})")
    _need(0 < args.top_p <= 1, "--top-p", f"must be in (0, 1] (got {args.top_p})")
    _need(args.top_k >= 0, "--top-k", f"must be >= 0 (got {args.top_k})")
    _need(args.temperature > 0, "--temperature", f"must be positive (got {args.temperature})")
    _need(args.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size", "must be >= 0")
    _need(args.dev_num == -1 or args.dev_num > 0, "--dev-num", f"must be -1 (all) or positive (got {args.dev_num})")
    for name, n in args.dataset_limit:
        _need(n >= 0, "--dataset-limit", f"{name}={n}: N must be >= 0")
    _need(Path(args.ckpt).is_dir(), "--ckpt", f"{args.ckpt} is not a directory")
    _need(Path(args.data_dir).is_dir(), "--data-dir", f"{args.data_dir} is not a directory")
    _need(args.base_model_path is None or Path(args.base_model_path).is_dir(), "--base-model-path",
          f"{args.base_model_path} is not a directory")
    return EvalConfig(ckpt=args.ckpt, data_dir=args.data_dir, datasets=list(args.datasets), seeds=list(args.seeds),
                      base_model_path=args.base_model_path, out_dir=args.out_dir, batch_size=args.eval_batch_size,
                      max_prompt_length=args.max_prompt_length, max_new_tokens=max_new, greedy=args.greedy,
                      top_p=args.top_p, top_k=args.top_k, temperature=args.temperature,
                      no_repeat_ngram_size=args.no_repeat_ngram_size, limit=args.dev_num,
                      limits=dict(args.dataset_limit), lm_loss=not args.no_lm_loss, overwrite=args.overwrite,
                      dtype=args.dtype)


def main(argv: list[str] | None = None) -> int:
    return run_main("evaluate.py", _main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=args.log_level.upper() if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's "Using default tokenizer."
    if args.command == "run":
        from mckd.dist import init_evaluation
        from mckd.evaluation.results import results_markdown
        from mckd.evaluation.runner import run_evaluation

        cfg = config_from_args(args)
        ctx = init_evaluation(args.device)
        try:
            res = run_evaluation(cfg, ctx)
        finally:
            ctx.close()
        if res is not None:
            print(results_markdown(res, title=f"{cfg.ckpt} ({cfg.resolved_out_dir()})"))
    elif args.command == "aggregate":
        from mckd.evaluation.results import results_markdown, write_results

        print(results_markdown(write_results(args.eval_dir), title=args.eval_dir))
    else:
        from mckd.evaluation.results import compare

        md, csv_text = compare(args.runs, names=args.names, metric=args.metric, datasets=args.datasets)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".md").write_text(md)
            out.with_suffix(".csv").write_text(csv_text)
            print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
        print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

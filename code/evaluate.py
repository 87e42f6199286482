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
from mckd.evaluation.runner import EvalConfig  # noqa: E402
from mckd.options import add_options, finite_floats, values_of  # noqa: E402

COMMANDS = ("run", "aggregate", "compare")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    r = sub.add_parser("run", help="generate and score (dataset, seed) pairs", allow_abbrev=False)
    add_options(r, EvalConfig, title="evaluation")
    r.set_defaults(data_dir=str(ROOT / "data"))  # the repository's data folder
    r.add_argument("--max-length", type=int, default=None,
                   help="published form: max_new_tokens = max_length - max_prompt_length")
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
    finite_floats(p)
    return p


def _need(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise UsageError(f"{flag}: {msg}")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Validate the ``run`` flags (before anything is loaded or written) and build the config."""
    values = values_of(EvalConfig, vars(args))
    max_new = args.max_new_tokens
    if args.max_length is not None:
        max_new = args.max_length - args.max_prompt_length
        _need(max_new > 0, "--max-length",
              f"{args.max_length} must exceed --max-prompt-length {args.max_prompt_length}")
    for flag, val in (("--eval-batch-size", args.batch_size), ("--max-prompt-length", args.max_prompt_length),
                      ("--max-new-tokens", args.max_new_tokens)):
        _need(val >= 1, flag, f"must be >= 1 (got {val})")
    _need(0 < args.top_p <= 1, "--top-p", f"must be in (0, 1] (got {args.top_p})")
    _need(args.top_k >= 0, "--top-k", f"must be >= 0 (got {args.top_k})")
    _need(args.temperature > 0, "--temperature", f"must be positive (got {args.temperature})")
    _need(args.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size", "must be >= 0")
    _need(args.limit == -1 or args.limit > 0, "--dev-num", f"must be -1 (all) or positive (got {args.limit})")
    for name, n in args.limits.items():
        _need(n >= 0, "--dataset-limit", f"{name}={n}: N must be >= 0")
    _need(Path(args.ckpt).is_dir(), "--ckpt", f"{args.ckpt} is not a directory")
    _need(Path(args.data_dir).is_dir(), "--data-dir", f"{args.data_dir} is not a directory")
    _need(args.base_model_path is None or Path(args.base_model_path).is_dir(), "--base-model-path",
          f"{args.base_model_path} is not a directory")
    values.update(max_new_tokens=max_new, datasets=list(args.datasets), seeds=list(args.seeds))
    return EvalConfig(**values)


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

"""Train a student by SFT or knowledge distillation (every criterion), one entry point for all.

Launch commands (run from the repository root; see docs/training.md for every flag)::

    # CPU or one GPU, single process
    python code/distillation.py --model-path model_hub/gpt2/gpt2-base --data-dir data/dolly \
        --save-dir outputs/gpt2/gpt2-base/sft/run1 --criterion cross_entropy --lr 5e-4 \
        --batch-size 4 --gradient-accumulation-steps 2 --num-epochs 20 --precision bf16

    # several GPUs on one node, torch DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node 4 code/distillation.py ...same flags...

    # DeepSpeed (ZeRO stage, offload: from the json; batch/accumulation/clipping/precision: our flags)
    deepspeed --num_gpus 4 code/distillation.py ... --deepspeed --deepspeed_config configs/deepspeed/ds_config_bf16.json

    # multi-node
    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 8 --master_addr $MASTER --master_port 29500 \
        code/distillation.py ...
    deepspeed --hostfile hostfile code/distillation.py ... --deepspeed --deepspeed_config ...

    # continue an interrupted run (same flags plus --resume)
    python code/distillation.py ... --resume

A knowledge-distillation criterion needs ``--teacher-model-path``; the scripts in scripts/ set all
of this from environment variables. Exit status: 0 done, 2 bad input (a one-line message; the
traceback with ``--debug`` or ``MCKD_DEBUG=1``), 1 stopped by divergence, 130 interrupted.
"""
from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one-line message; traceback with --debug or MCKD_DEBUG=1),
    1 stopped by divergence or non-finite steps, 130 interrupted (a resumable state is saved)."""
    from mckd.cli import run_main

    return run_main("distillation.py", _train, argv)


def _train(argv: list[str]) -> int:
    from mckd import dist
    from mckd.config import parse_config

    handler = logging.StreamHandler()
    handler.addFilter(dist.RankZeroFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    cfg = parse_config(argv)
    from mckd.train.loop import run

    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

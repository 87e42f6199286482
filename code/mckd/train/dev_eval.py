"""Dev evaluation during training.

* Teacher-forced: token cross-entropy and next-token accuracy of the student over the label tokens
  of the dev set, summed over ranks and divided by the global token count.
* Generation: ROUGE-L / exact match (``mckd.evaluation.metrics.compute_metrics``) of generations
  for the first ``--eval-gen-num`` dev examples, through the batched helper
  ``mckd.evaluation.generate`` (left padding, KV cache, per-batch seeds), averaged over
  ``--eval-gen-repeat-times`` passes. The live model's dtype is never changed (the published code
  cast the student to fp16 after a failed generation); ``--no-repeat-ngram-size`` applies to
  dev as to the final evaluation (the published dev evaluation used 0).

Every rank evaluates a shard; shards are padded to the same number of batches (padding rows carry
no weight) so that collective forwards (ZeRO-3) stay in lock step.
"""
from __future__ import annotations

import logging
import math

import torch

from mckd import dist
from mckd.data.batch import IGNORE_INDEX
from mckd.evaluation.metrics import compute_metrics, token_nll

logger = logging.getLogger(__name__)


def _shard(n: int, batch_size: int) -> list[list[int]]:
    """Batches of dataset indices for this rank; every rank gets the same number of batches
    (missing rows are -1 = padding)."""
    w, r = dist.world_size(), dist.rank()
    batches = [list(range(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    per_rank = math.ceil(len(batches) / w) if batches else 0
    mine = batches[r::w]
    return mine + [[-1]] * (per_rank - len(mine))


@torch.no_grad()
def teacher_forced(module, dataset, collator, *, batch_size: int, device, autocast) -> dict[str, float]:
    """Dev token loss and accuracy of the student.

    Args:
        module: the engine's forward-able student (DDP/DeepSpeed wrapped or raw HF model).
        dataset: processed dev rows (``mckd.data.build_dataset`` without a teacher).
        collator: ``DistillCollator`` for the student.
        batch_size: rows per forward.
        device: where batches go.
        autocast: a callable returning the engine's autocast context.

    Returns:
        ``{"loss": mean token NLL, "accuracy": token accuracy (0-1), "tokens": count}``.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, correct, tokens
    was_training = module.training
    module.eval()
    try:
        for idx in _shard(len(dataset), batch_size):
            real = [i for i in idx if i >= 0]
            rows = [dataset[i] for i in (real or [0])]
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            weight = 1.0 if real else 0.0
            with autocast():
                logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
            labels = batch["labels"]
            mask = labels != IGNORE_INDEX
            nll = token_nll(logits, labels, IGNORE_INDEX)
            correct = (logits.argmax(-1) == labels) & mask
            sums += weight * torch.stack([(nll * mask).sum().double(), correct.sum().double(),
                                          mask.sum().double()])
    finally:
        module.train(was_training)
    dist.all_reduce_sum(sums)
    tok = max(1.0, float(sums[2]))
    return {"loss": float(sums[0]) / tok, "accuracy": float(sums[1]) / tok, "tokens": int(sums[2])}


def generation_scores(model, tokenizer, prompts: list[dict], *, batch_size: int, max_new_tokens: int,
                      do_sample: bool, top_p: float, top_k: int, temperature: float,
                      no_repeat_ngram_size: int, seed: int, repeat_times: int = 1,
                      synced_gpus: bool = False) -> tuple[dict[str, float], list[str]]:
    """ROUGE-L / EM of generations for ``prompts`` (``build_prompt_dataset`` rows).

    Args:
        model: HF model (unwrapped; PEFT allowed), in eval dtype as trained.
        synced_gpus: ZeRO-3: every rank generates every batch in lock step (parameters are
            gathered collectively); otherwise batches are split across ranks.

    Returns:
        (metrics averaged over repeats, predictions of the first pass in prompt order)
    """
    from mckd.evaluation import generate as gen

    if not prompts:
        return {"rougeL": 0.0, "exact_match": 0.0}, []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = gen.generation_kwargs(max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p,
                               top_k=top_k, temperature=temperature,
                               no_repeat_ngram_size=no_repeat_ngram_size,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    if synced_gpus:
        kw["synced_gpus"] = True
    plan = gen.plan_batches([len(p["prompt_ids"]) for p in prompts], batch_size)
    w, r = (1, 0) if synced_gpus else (dist.world_size(), dist.rank())
    refs = [p["references"] for p in prompts]
    totals: dict[str, float] = {}
    first_preds: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for rep in range(repeat_times):
            local: dict[int, list[int]] = {}
            for b, idx in enumerate(plan):
                if b % w != r:
                    continue
                outs = gen.generate_one_batch(model, [prompts[i]["prompt_ids"] for i in idx],
                                              pad_id=pad_id, stop_ids=[tokenizer.eos_token_id],
                                              gen_kwargs=kw, seed=gen.batch_seed(seed + rep, b))
                local.update(zip(idx, outs))
            merged: dict[int, list[int]] = {}
            for part in dist.all_gather_object(local) if not synced_gpus else [local]:
                merged.update(part)
            preds = [tokenizer.decode(merged[i], skip_special_tokens=True) for i in range(len(prompts))]
            scores = compute_metrics(preds, refs)
            for k, v in scores.items():
                totals[k] = totals.get(k, 0.0) + v / repeat_times
            if rep == 0:
                first_preds = preds
    finally:
        model.train(was_training)
    return {k: round(v, 4) for k, v in totals.items()}, first_preds

"""Batched generation: length-sorted batches, left padding, KV cache, per-batch seeds.

The published evaluation left-padded every prompt to 256 tokens and generated 256 new
tokens with ``do_sample``, ``top_p=1.0``, ``top_k=0``, ``temperature=1.0`` and
``no_repeat_ngram_size=6``. Here prompts are grouped into batches of similar length (sorted by
length, longest first, so an out-of-memory error shows up on the first batch), left-padded only to
the longest prompt of their batch, and decoded with the KV cache of ``model.generate``.

Determinism: every batch gets its own seed derived from ``(seed, global batch index)``, inside a
forked RNG so the caller's random state is left untouched. Because batches are formed from the
global length order (:func:`plan_batches`) before they are split across processes, the same batch
holds the same examples with the same seed whatever the number of processes, so results do not
depend on the world size (greedy and sampled alike, on a deterministic backend).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Sequence

import torch

from mckd.models.access import unwrap_model

logger = logging.getLogger(__name__)

# Large odd multiplier: batch seeds of neighbouring (seed, batch) pairs never collide.
_SEED_STRIDE = 1_000_003


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group example indices into batches of similar length.

    Args:
        lengths: prompt length (tokens) of each example, ``N`` entries.
        batch_size: examples per batch (the last batch may be smaller).

    Returns:
        Batches of example indices, longest prompts first; every index appears exactly once. Ties
        are broken by index, so the plan is a pure function of ``lengths`` and ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(seed: int, batch_index: int) -> int:
    """The RNG seed of one batch (non-negative, < 2**63)."""
    return (int(seed) * _SEED_STRIDE + int(batch_index)) % (2**63 - 1)


def generating_model(model):
    """The module that owns ``generate`` (DDP / DeepSpeed wrappers stripped, a PEFT model kept)."""
    net = unwrap_model(model, keep_peft=True)
    if not hasattr(net, "generate"):
        raise TypeError(f"{type(net).__name__} has no generate(); pass a Hugging Face causal LM")
    return net


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _check_positions(model, needed: int) -> None:
    """Fail clearly (instead of an index error deep in the model) when prompt + new tokens exceed
    the model's position table."""
    cfg = getattr(model, "config", None)
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if isinstance(limit, int) and needed > limit:
        raise ValueError(f"longest prompt + max_new_tokens = {needed} tokens exceeds the model's {limit} positions: "
                         "lower --max-prompt-length or --max-new-tokens")


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists.

    Returns:
        ``input_ids`` (B, T) long and ``attention_mask`` (B, T) long, T = longest prompt.
    """
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        if len(p):
            ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


def strip_generated(new_ids: torch.Tensor, stop_ids: Iterable[int]) -> list[list[int]]:
    """Cut each row of generated ids before its first stop (eos) token.

    Args:
        new_ids: (B, L) generated token ids (prompt removed). Rows finished early are padded by
            ``generate`` after their eos, so cutting at the first eos removes the padding too.
        stop_ids: eos token id(s).
    """
    stop = torch.as_tensor(sorted(set(int(s) for s in stop_ids)), dtype=new_ids.dtype, device=new_ids.device)
    is_stop = torch.isin(new_ids, stop)  # (B, L)
    L = new_ids.shape[1]
    first = torch.where(is_stop.any(1), is_stop.float().argmax(1), torch.full_like(is_stop[:, 0], L, dtype=torch.long))
    rows = new_ids.tolist()
    return [r[:n] for r, n in zip(rows, first.tolist())]


def generation_kwargs(*, max_new_tokens: int, do_sample: bool, top_p: float, top_k: int, temperature: float,
                      no_repeat_ngram_size: int, eos_token_id, pad_token_id: int) -> dict:
    """Every decoding option set explicitly, so a model's own ``generation_config.json`` (e.g. the
    temperature 0.6 / top-p 0.9 of Llama-2 chat) cannot leak into the protocol."""
    kw = dict(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample), num_beams=1,
              no_repeat_ngram_size=int(no_repeat_ngram_size), repetition_penalty=1.0,
              eos_token_id=eos_token_id, pad_token_id=int(pad_token_id), use_cache=True)
    if do_sample:  # greedy ignores the warpers (and Transformers warns if they are passed)
        kw.update(top_p=float(top_p), top_k=int(top_k), temperature=float(temperature))
    return kw


def generate_one_batch(model, prompt_ids: Sequence[Sequence[int]], *, pad_id: int, stop_ids: Sequence[int],
                       gen_kwargs: dict, seed: int | None) -> list[list[int]]:
    """Generate for one batch of prompts (already chosen); returns new ids per prompt, eos excluded."""
    device = _device_of(model)
    _check_positions(model, max(len(p) for p in prompt_ids) + int(gen_kwargs.get("max_new_tokens", 0)))
    ids, mask = left_pad(prompt_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    fork = (torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            if seed is not None else contextlib.nullcontext())
    with fork, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    new = out[:, ids.shape[1]:]  # (B, L_new)
    return strip_generated(new, stop_ids)


def generate_batched(model, tokenizer, prompt_ids: list[list[int]], *, batch_size: int, max_new_tokens: int = 256,
                     do_sample: bool = True, top_p: float = 1.0, top_k: int = 0, temperature: float = 1.0,
                     no_repeat_ngram_size: int = 6, seed: int | None = None) -> list[list[int]]:
    """Generate continuations for many prompts, in batches sorted by prompt length.

    Args:
        model: a Hugging Face causal LM (or a DDP/DeepSpeed wrapper whose ``.module`` is one), on
            its device and in its dtype; neither is changed. Its train/eval mode is restored after.
        tokenizer: supplies ``pad_token_id`` (left padding) and ``eos_token_id`` (stop token).
        prompt_ids: ``N`` prompts as token-id lists (already truncated, no padding).
        batch_size: prompts per ``generate`` call.
        max_new_tokens, do_sample, top_p, top_k, temperature, no_repeat_ngram_size: decoding options
            (defaults: the published evaluation protocol).
        seed: base seed; batch ``b`` (in length order) runs under ``batch_seed(seed, b)``. ``None``
            uses the current global RNG.

    Returns:
        ``N`` lists of new token ids, in input order, cut before the first eos.
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate_batched: empty prompt at index "
                         f"{next(i for i, p in enumerate(prompt_ids) if len(p) == 0)}")
    net = generating_model(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = [tokenizer.eos_token_id]
    kw = generation_kwargs(max_new_tokens=max_new_tokens, do_sample=do_sample, top_p=top_p, top_k=top_k,
                           temperature=temperature, no_repeat_ngram_size=no_repeat_ngram_size,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    was_training = net.training
    net.eval()
    results: list[list[int] | None] = [None] * len(prompt_ids)
    try:
        for b, idx in enumerate(plan_batches([len(p) for p in prompt_ids], batch_size)):
            outs = generate_one_batch(net, [prompt_ids[i] for i in idx], pad_id=pad_id, stop_ids=stop_ids,
                                      gen_kwargs=kw, seed=None if seed is None else batch_seed(seed, b))
            for i, o in zip(idx, outs):
                results[i] = o
    finally:
        net.train(was_training)
    return results  # type: ignore[return-value]

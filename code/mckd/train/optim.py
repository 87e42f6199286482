"""Optimizer parameter groups and learning-rate schedules.

Parameter groups:
* student parameters with weight decay;
* student biases and the weights of EVERY normalisation layer (any ``nn.LayerNorm``,
  ``nn.GroupNorm``, ``nn.BatchNorm*`` or any module whose class name ends in ``RMSNorm`` or
  ``LayerNorm``, e.g. ``LlamaRMSNorm``, ``Qwen2RMSNorm``) without decay (embeddings are decayed,
  as in the published code);
* the criterion's trainable parts (projectors, heads) at ``--projector-lr`` (decay as the
  published code: the optimizer default), biases and norms there without decay too.

Schedules count optimizer steps: linear warmup from 0 over ``warmup`` steps (honoured by every
style), then cosine / linear decay from ``lr`` to ``lr_min`` at ``total`` steps, or constant.
The same multiplier shape applies to every group (projector groups decay with their own peak).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def is_norm_module(m: nn.Module) -> bool:
    """True for every normalisation layer of any model family (detected by type, not by name)."""
    if isinstance(m, _NORM_TYPES) or (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)):
        return True
    name = type(m).__name__
    return name.endswith("RMSNorm") or name.endswith("LayerNorm") or name.endswith("RmsNorm")


def no_decay_parameter_ids(module: nn.Module) -> set[int]:
    """ids of biases and of every parameter owned directly by a normalisation layer."""
    out: set[int] = set()
    for m in module.modules():
        norm = is_norm_module(m)
        for pname, p in m.named_parameters(recurse=False):
            if norm or pname == "bias" or pname.endswith("_bias"):
                out.add(id(p))
    return out


def param_groups(student: nn.Module, criterion: nn.Module | None, *, lr: float, weight_decay: float,
                 projector_lr: float | None) -> list[dict]:
    """AdamW parameter groups (only parameters with ``requires_grad``; empty groups dropped).

    Returns:
        Groups named ``student_decay``, ``student_no_decay``, ``criterion_decay``,
        ``criterion_no_decay`` (key ``"name"``), each with its ``lr`` and ``weight_decay``.
    """
    groups = []
    seen: set[int] = set()
    for prefix, mod, group_lr in (("student", student, lr),
                                  ("criterion", criterion, projector_lr or lr)):
        if mod is None:
            continue
        nd = no_decay_parameter_ids(mod)
        decay, no_decay = [], []
        for p in mod.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if id(p) in nd else decay).append(p)
        for suffix, params, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": f"{prefix}_{suffix}", "params": params, "lr": group_lr,
                               "weight_decay": wd})
    return groups


def build_optimizer(groups: list[dict], *, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """torch AdamW (the published optimizer) over the given groups."""
    n = {g["name"]: sum(getattr(p, "ds_numel", p.numel()) for p in g["params"]) for g in groups}  # ds_numel: ZeRO-3
    logger.info("optimizer groups (parameters): %s", n)
    return torch.optim.AdamW(groups, betas=betas, eps=eps)


def lr_multiplier(step: int, *, total: int, warmup: int, style: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps.

    Args:
        step: optimizer steps taken so far (0 before the first step).
        total: total optimizer steps of the run.
        warmup: linear warmup steps (the first step uses ``1 / warmup`` of the peak).
        style: "cosine" | "linear" | "constant".
        min_ratio: ``lr_min / lr``, the floor reached at ``total``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if style == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if style == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif style == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"--lr-decay-style: unknown style {style!r} (cosine, linear, constant)")
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, total: int, warmup: int, style: str,
                    lr: float, lr_min: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every group with :func:`lr_multiplier` (stepped once per optimizer step)."""
    ratio = min(1.0, lr_min / lr) if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total=total, warmup=warmup, style=style, min_ratio=ratio))

"""The one place that unwraps models and finds their input embeddings and output heads.

Handles GPT-2, Qwen2, LLaMA, Mistral and OPT causal LMs (any Hugging Face ``PreTrainedModel``
with ``get_input_embeddings``/``get_output_embeddings``), also when wrapped by PEFT
(``PeftModel``), DDP / DeepSpeed (``.module``) or ``torch.compile`` (``._orig_mod``), in any nesting.
The published DSKD code probed attribute paths per family and broke for GPT-2 teachers and OPT;
asking the model itself does not.
"""
from __future__ import annotations

import torch
from torch import nn

from mckd.models.view import ModelView


def _is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "get_input_embeddings") and hasattr(model, "config")


def unwrap_model(model: nn.Module, *, keep_peft: bool = False) -> nn.Module:
    """Strip DDP/DeepSpeed (``.module``), ``torch.compile`` (``._orig_mod``) and PEFT wrappers.

    Args:
        model: the model, wrapped in any nesting.
        keep_peft: stop at a PEFT model (the one that owns ``generate`` and ``save_pretrained`` of
            the adapter) instead of stripping it.

    Returns:
        The innermost Hugging Face model (for PEFT: the base model, LoRA layers still inside), or
        the PEFT model with ``keep_peft``.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            model = orig
            continue
        get_base = getattr(model, "get_base_model", None)
        if not keep_peft and callable(get_base) and type(model).__name__.startswith("Peft"):
            model = get_base()
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and not _is_hf_model(model):
            model = inner
            continue
    return model


def get_input_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding module (ids -> (.., D)) of a possibly wrapped causal LM."""
    base = unwrap_model(model)
    if not hasattr(base, "get_input_embeddings"):
        raise TypeError(f"get_input_embeddings: {type(base).__name__} is not a Hugging Face model "
                        f"(no get_input_embeddings); wrapped as {type(model).__name__}")
    emb = base.get_input_embeddings()
    if emb is None:
        raise TypeError(f"get_input_embeddings: {type(base).__name__} returned no embedding module")
    return emb


def get_output_head(model: nn.Module) -> nn.Module:
    """The output projection (a module with ``.weight`` of shape (V, D)) of a causal LM."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise TypeError(f"get_output_head: {type(base).__name__} has no output head "
                        f"(get_output_embeddings() is None); a causal-LM class is needed")
    return head


def model_view(model: nn.Module, logits: torch.Tensor,
               hidden: torch.Tensor | None = None) -> ModelView:
    """Bundle one forward's outputs with the model's embedding table and head.

    Args:
        model: the (possibly wrapped) model that produced the outputs.
        logits: (B, T, V).
        hidden: (B, T, D) last-layer hidden states or None.
    """
    return ModelView(logits=logits, hidden=hidden, embed_tokens=get_input_embeddings(model),
                     lm_head=get_output_head(model))

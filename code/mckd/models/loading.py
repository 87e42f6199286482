"""Loading the student and the teacher from local Hugging Face directories.

* The family (gpt2, qwen2, llama, mistral, opt, ...) is read from ``config.json``, never from the
  path or a flag; a ``--model-type`` given on the command line is only checked against it.
* Weights are loaded once, in the dtype they will be used in: the plain-torch engine
  keeps fp32 master weights for the student; DeepSpeed and the teacher load in the training dtype.
* The teacher is frozen (``requires_grad=False``), in eval mode, optionally with a LoRA adapter
  merged in; the loop runs it under ``torch.no_grad()``.
* Sizes the criteria need are read from the configs into :class:`mckd.criteria.base.ModelDims`.

Nothing is ever downloaded: every call passes ``local_files_only=True``.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from mckd.models.view import ModelDims, ModelView
from mckd.models.tokenizers import TokenizerLoadError, load_tokenizer

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("gpt2", "qwen2", "llama", "mistral", "opt")
# Family spellings of the published --model-type values -> config.json model_type.
_FAMILY_ALIASES = {"qwen": "qwen2", "llama2": "llama", "tinyllama": "llama", "gpt2": "gpt2",
                   "mistral": "mistral", "opt": "opt", "llama": "llama", "qwen2": "qwen2"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """A model or adapter that cannot be loaded; the message names the flag and the path."""


def torch_dtype(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16`` (fp32, fp16, bf16)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_config(path: str, *, what: str = "student", flag: str = "--model-path"):
    """The HF config of a local model directory, with a clear error when it is not one."""
    from transformers import AutoConfig

    if not path or not os.path.isdir(path):
        raise ModelLoadError(f"{flag}: {what} directory {path!r} does not exist")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the flag and path
        raise ModelLoadError(f"{flag}: cannot read the {what} config in {path}: {e}") from e


def model_family(config, *, declared: str | None = None, what: str = "student") -> str:
    """The model family from the config (``config.model_type``); warn when ``declared`` disagrees."""
    family = config.model_type
    if family not in SUPPORTED_FAMILIES:
        logger.warning("%s family %r is not one of the tested families %s; loading it through "
                       "AutoModelForCausalLM anyway", what, family, SUPPORTED_FAMILIES)
    if declared is not None and _FAMILY_ALIASES.get(declared, declared) != family:
        logger.warning("%s: --*model-type %r does not match config.json model_type %r; the config "
                       "wins", what, declared, family)
    return family


def hidden_size(config) -> int:
    """Hidden size of any family (GPT-2 calls it ``n_embd``)."""
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ModelLoadError(f"cannot find the hidden size in the {config.model_type} config")


def read_dims(student_path: str, teacher_path: str | None = None) -> ModelDims:
    """Sizes from the configs (never passed by hand). The vocab size is the *logit* width
    (``config.vocab_size``), which may exceed the tokenizer's length (padded embeddings)."""
    s = load_config(student_path)
    dims = ModelDims(student_hidden=hidden_size(s), student_vocab=int(s.vocab_size))
    if teacher_path is not None:
        t = load_config(teacher_path, what="teacher", flag="--teacher-model-path")
        dims.teacher_hidden, dims.teacher_vocab = hidden_size(t), int(t.vocab_size)
    return dims


def _from_pretrained(path: str, dtype: torch.dtype, *, what: str, flag: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the flag and path
        raise ModelLoadError(f"{flag}: cannot load the {what} model from {path}: {e}") from e


def load_student(path: str, *, dtype: str = "fp32", gradient_checkpointing: bool = False,
                 declared_type: str | None = None, peft: str | None = None, lora_r: int = 16,
                 lora_alpha: int = 64, lora_dropout: float = 0.1,
                 lora_target_modules: list[str] | None = None, peft_path: str | None = None):
    """Load the student model and tokenizer for training.

    Args:
        path: local HF directory.
        dtype: "fp32" | "fp16" | "bf16" weight dtype.
        gradient_checkpointing: enable HF gradient checkpointing.
        declared_type: the published ``--model-type`` (checked against config.json only).
        peft: None or "lora".
        lora_r, lora_alpha, lora_dropout, lora_target_modules: fresh LoRA settings.
        peft_path: an existing adapter to continue training (its own LoRA config is used).

    Returns:
        (model, tokenizer, family)
    """
    config = load_config(path)
    family = model_family(config, declared=declared_type)
    tokenizer = _tokenizer(path, "student", "--model-path")
    model = _from_pretrained(path, torch_dtype(dtype), what="student", flag="--model-path")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if peft == "lora":
        model = _wrap_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                           target_modules=lora_target_modules, adapter_path=peft_path)
    elif peft is not None:
        raise ModelLoadError(f"--peft: unsupported method {peft!r} (only 'lora')")
    return model, tokenizer, family


def _wrap_lora(model, *, r: int, alpha: int, dropout: float, target_modules: list[str] | None,
               adapter_path: str | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if adapter_path is not None:
        try:
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"--peft-path: cannot load the LoRA adapter {adapter_path}: {e}") from e
    else:
        cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                         target_modules=target_modules, inference_mode=False)
        try:
            model = get_peft_model(model, cfg)
        except ValueError as e:
            raise ModelLoadError(f"--peft-target-modules: {e}") from e
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("LoRA student: %d trainable of %d parameters (%.2f%%)", n_train, n_all,
                100.0 * n_train / max(1, n_all))
    return model


def _tokenizer(path: str, what: str, flag: str):
    try:
        return load_tokenizer(path, what=what)
    except TokenizerLoadError as e:
        raise ModelLoadError(f"{flag}: {e}") from e


def load_teacher(path: str, *, dtype: str = "fp32", declared_type: str | None = None,
                 peft_path: str | None = None):
    """Load the teacher: frozen, eval mode, LoRA adapter merged when given.

    Returns:
        (model, tokenizer, family)
    """
    config = load_config(path, what="teacher", flag="--teacher-model-path")
    family = model_family(config, declared=declared_type, what="teacher")
    tokenizer = _tokenizer(path, "teacher", "--teacher-model-path")
    model = _from_pretrained(path, torch_dtype(dtype), what="teacher", flag="--teacher-model-path")
    if peft_path is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, peft_path).merge_and_unload()
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"--teacher-peft-path: cannot load/merge {peft_path}: {e}") from e
    freeze(model)
    return model, tokenizer, family


def freeze(model: nn.Module) -> nn.Module:
    """No gradients, eval mode (dropout off). Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model


def model_view(model: nn.Module, outputs: Any, *, with_hidden: bool) -> ModelView:
    """Wrap HF outputs for a criterion: logits, last hidden state, embedding table and head
    (found through :mod:`mckd.models.access`, which unwraps PEFT/DDP/DeepSpeed)."""
    from mckd.models import access

    hidden = outputs.hidden_states[-1] if with_hidden else None
    return access.model_view(model, outputs.logits, hidden)

"""Loading a checkpoint for evaluation: a full Hugging Face model or a LoRA adapter.

* A directory with ``adapter_config.json`` is a LoRA adapter. Its base model comes from, in order:
  the ``base_model_path`` argument, the ``MODEL_PATH`` environment variable, the adapter config's
  ``base_model_name_or_path``. The adapter is applied with ``peft`` and not merged (as published).
* The model family is read from the (base) model's ``config.json`` (``model_type``), never parsed
  from the checkpoint path (the published ``awk $(NF-4)`` broke on any other layout).
* The tokenizer comes from the checkpoint directory when it holds tokenizer files, else from the
  base model, through :func:`mckd.models.tokenizers.load_tokenizer` (pad/eos rules).
* Weights are loaded directly in the evaluation dtype (fp32 on CPU; bf16 on GPUs that support it,
  else fp16); nothing is cast in place afterwards.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mckd.models.tokenizers import has_tokenizer_files, load_tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be evaluated; the message says why and where."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`resolve_checkpoint` found.

    Attributes:
        path: the checkpoint directory (full model or adapter).
        is_lora: True for an adapter directory.
        model_dir: the directory holding the full model weights (the base model for LoRA).
        tokenizer_dir: where the tokenizer is loaded from.
        model_type: ``config.model_type`` of the (base) model, e.g. ``gpt2``, ``qwen2``, ``llama``.
    """

    path: Path
    is_lora: bool
    model_dir: Path
    tokenizer_dir: Path
    model_type: str


def resolve_checkpoint(ckpt: str | os.PathLike, base_model_path: str | None = None) -> CheckpointInfo:
    """Inspect a checkpoint directory without loading weights.

    Raises:
        CheckpointError: missing directory, no ``config.json`` for a full model, or a LoRA adapter
            whose base model cannot be found locally.
    """
    path = Path(ckpt)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        base = base_model_path or os.environ.get("MODEL_PATH") or ""
        if not base:
            try:
                base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path") or ""
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{adapter_cfg}: invalid JSON ({e.msg})") from None
        if not base or not Path(base).is_dir():
            raise CheckpointError(
                f"LoRA adapter {path}: base model {base!r} is not a local directory; pass "
                "--base-model-path or set MODEL_PATH (nothing is downloaded)")
        model_dir = Path(base)
    else:
        model_dir = path
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{model_dir} has no config.json (not a Hugging Face model directory)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{cfg_file}: not a JSON object") from None
    if not model_type:
        raise CheckpointError(f"{cfg_file}: no 'model_type'")
    tok_dir = path if has_tokenizer_files(path) else model_dir
    if not has_tokenizer_files(tok_dir):
        where = str(path) if model_dir == path else f"{path} or its base model {model_dir}"
        raise CheckpointError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, ...) in {where}")
    return CheckpointInfo(path=path, is_lora=adapter_cfg.is_file(), model_dir=model_dir,
                          tokenizer_dir=tok_dir, model_type=model_type)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU, bf16 on a GPU that supports it, else fp16; or an explicit name."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def load_for_eval(info: CheckpointInfo, *, device: torch.device, dtype: torch.dtype):
    """Load model (eval mode, on ``device``, in ``dtype``) and tokenizer.

    Returns:
        ``(model, tokenizer)``; for LoRA the model is a ``peft.PeftModel`` (not merged).
    """
    from transformers import AutoModelForCausalLM

    from mckd.models.tokenizers import TokenizerLoadError

    try:
        tokenizer = load_tokenizer(str(info.tokenizer_dir), what="evaluated model")
        model = AutoModelForCausalLM.from_pretrained(info.model_dir, dtype=dtype, local_files_only=True)
        if info.is_lora:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(info.path), is_trainable=False)
    except TokenizerLoadError as e:
        raise CheckpointError(str(e)) from None
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot load the model in {info.path}: {first}") from None
    model.to(device).eval()
    logger.info("loaded %s (%s%s) in %s on %s", info.path, info.model_type, ", LoRA" if info.is_lora else "",
                dtype, device)
    return model, tokenizer

"""The trainable module and the two engines (plain torch / DDP and DeepSpeed).

One :class:`DistillModule` holds the student and the criterion (its projectors and heads) and is
what DDP or DeepSpeed wraps; the teacher stays outside, inference only. The loop talks to an
engine through four calls, whatever the backend:

* ``engine.forward(batch, teacher_view)`` -> criterion output (student forward inside),
* ``engine.backward(loss, last_micro_batch)``,
* ``engine.finish_step()`` -> (grad norm, skipped) once per optimizer step,
* ``engine.lr()`` and ``state_dict`` / ``load_state_dict`` for checkpoints.

Loss scale: the loop passes ``loss_sum * engine.loss_scale(T)`` where ``T`` is the
label-token count of the optimizer step summed over micro-batches and ranks. DDP averages
gradients over ``W`` ranks and DeepSpeed additionally divides by the accumulation steps, so
the scale is ``W / T`` (torch) or ``W * gas / T`` (DeepSpeed); both give the gradient of the
token mean over the global batch.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math

import torch
from torch import nn

from mckd import dist
from mckd.criteria.base import Criterion, CriterionOutput
from mckd.models.access import unwrap_model
from mckd.models.loading import model_view

logger = logging.getLogger(__name__)

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(model: nn.Module, batch: dict, prefix: str = "") -> dict:
    """The keyword inputs of an HF forward from a batch (``teacher_`` prefix for the teacher).
    ``position_ids`` is passed only when the model's forward accepts it."""
    fwd = unwrap_model(model).forward
    accepts = inspect.signature(fwd).parameters
    out = {}
    for k in MODEL_INPUT_KEYS:
        if prefix + k in batch and (k != "position_ids" or "position_ids" in accepts):
            out[k] = batch[prefix + k]
    return out


class DistillModule(nn.Module):
    """Student + criterion: the one module DDP/DeepSpeed wrap and the optimizer trains.

    ``forward(batch, teacher_view)`` runs the student (with hidden states only when the criterion
    needs them) and returns the criterion's ``(loss_sum, n_tokens, metrics)``.
    """

    def __init__(self, student: nn.Module, criterion: Criterion):
        super().__init__()
        self.student = student
        self.criterion = criterion
        # ZeRO-3 sets this to gather the teacher's embedding table and head for the criterion
        self.criterion_context = lambda teacher_view: contextlib.nullcontext()

    def forward(self, batch: dict, teacher_view=None) -> tuple:
        """Returns a plain tuple ``(loss_sum, n_tokens, metrics)``: ZeRO-3's hooks look for tensors
        in tuples and dicts, not in dataclasses."""
        need_h = self.criterion.needs_hidden
        out = self.student(**model_inputs(self.student, batch), output_hidden_states=need_h,
                           use_cache=False)
        view = model_view(self.student, out, with_hidden=need_h)
        with self.criterion_context(teacher_view):
            loss_sum, n_tokens, metrics = self.criterion(batch, view, teacher_view)
        return loss_sum, n_tokens, metrics


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class TorchEngine:
    """Single process or DDP: fp32 master weights, autocast for bf16/fp16 (GradScaler for fp16),
    global-norm clipping, and a step that is skipped when the gradient norm is not finite."""

    kind = "torch"

    def __init__(self, module: DistillModule, optimizer, scheduler, *, device: torch.device,
                 precision: str, clip_grad: float, clip_grad_criterion: float | None = None):
        self.raw = module.to(device)
        self.device, self.precision, self.clip_grad = device, precision, clip_grad
        self.clip_grad_criterion = clip_grad_criterion
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.world = dist.world_size()
        if self.world > 1:
            dist.broadcast_module_(module)  # identical start on every rank (criterion parts too)
            has_crit_params = any(p.requires_grad for p in module.criterion.parameters())
            self.module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=has_crit_params)
        else:
            self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.student_params = [p for p in module.student.parameters() if p.requires_grad]
        self.criterion_params = [p for p in module.criterion.parameters() if p.requires_grad]
        self.last_norms: dict[str, float] = {}

    def autocast(self):
        return _autocast(self.device, self.precision)

    def loss_scale(self, total_tokens: torch.Tensor) -> torch.Tensor:
        return self.world / total_tokens.clamp_min(1)

    def forward(self, batch: dict, teacher_view, *, last: bool) -> CriterionOutput:
        if self.world > 1:  # what DDP.no_sync() toggles: reduce gradients on the last micro-batch only
            self.module.require_backward_grad_sync = last
        with self.autocast():
            return CriterionOutput(*self.module(batch, teacher_view))

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def finish_step(self) -> tuple[float, bool]:
        """Clip, step the optimizer and scheduler unless the gradient is not finite.

        Returns:
            (global grad norm before clipping, skipped)
        """
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = self._clip()
        skipped = not math.isfinite(norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips internally on inf/nan
            self.scaler.update()
        elif not skipped:
            self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skipped

    def _clip(self) -> float:
        """Clip the gradients; returns the global norm before clipping.

        The student's and the criterion's gradient norms are also measured apart
        (``last_norms``). Without ``clip_grad_criterion`` every gradient is scaled by one factor
        from the global norm; with it, each part is clipped by its own norm, so a large projector
        gradient cannot shrink the student's step.
        """
        utils = torch.nn.utils

        def grads(ps):
            return [p.grad for p in ps if p.grad is not None]

        def norm(ps):
            g = grads(ps)
            return utils.get_total_norm(g).float() if g else torch.zeros((), device=self.device)

        parts = [norm(self.params), norm(self.student_params), norm(self.criterion_params)]
        n, n_s, n_c = torch.stack(parts).tolist()  # one host sync per step
        self.last_norms = {"grad_norm_student": n_s, "grad_norm_criterion": n_c}
        clips = ([(self.params, self.clip_grad, parts[0])] if self.clip_grad_criterion is None else
                 [(self.student_params, self.clip_grad, parts[1]),
                  (self.criterion_params, self.clip_grad_criterion, parts[2])])
        for ps, max_norm, total in clips:
            if max_norm > 0 and grads(ps):
                utils.clip_grads_with_norm_(ps, max_norm, total)
        return n

    def lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        sd = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler:
            sd["scaler"] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        if self.scaler and "scaler" in sd:
            self.scaler.load_state_dict(sd["scaler"])


def fill_deepspeed_config(ds: dict, *, batch_size: int, grad_acc: int, world_size: int,
                          clip_grad: float, precision: str) -> dict:
    """Our flags are the single source of truth for DeepSpeed's batch, clipping and precision
    fields; ZeRO stage, offload and buckets come from the json."""
    ds = dict(ds)
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds["gradient_accumulation_steps"] = grad_acc
    ds["train_batch_size"] = batch_size * grad_acc * world_size
    ds["gradient_clipping"] = clip_grad if clip_grad > 0 else 0.0
    ds["steps_per_print"] = 10 ** 9
    ds["zero_allow_untested_optimizer"] = True  # we pass a torch AdamW
    ds["zero_force_ds_cpu_optimizer"] = False
    ds["wall_clock_breakdown"] = False
    fp16 = dict(ds.get("fp16", {}))
    bf16 = dict(ds.get("bf16", {}))
    fp16["enabled"] = precision == "fp16"
    bf16 = {"enabled": precision == "bf16"}  # fp16 loss-scale keys do not belong in bf16
    ds["fp16"], ds["bf16"] = fp16, bf16
    zero = dict(ds.get("zero_optimization", {}))
    if int(zero.get("stage", 0)) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds["zero_optimization"] = zero
    return ds


class DeepSpeedEngine:
    """DeepSpeed (ZeRO 0-3, optional offload). DeepSpeed owns precision, clipping and the
    accumulation boundary; it steps our scheduler once per optimizer step."""

    kind = "deepspeed"

    def __init__(self, module: DistillModule, optimizer, scheduler, *, ds_config: dict):
        import deepspeed

        self.raw = module
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        self.device = self.engine.device
        self.world = dist.world_size()
        self.gas = int(ds_config["gradient_accumulation_steps"])
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.module = self.engine
        if self.zero_stage == 3:
            self._zero3_external_parameters(module)

    @staticmethod
    def _zero3_external_parameters(module: DistillModule) -> None:
        """ZeRO-3 gathers a parameter only while its own module runs. Criteria read the student's
        embedding table and head (and their own parameters) directly, so those are registered as
        parameters of the whole DistillModule forward; the frozen teacher's are gathered read-only
        around the criterion call."""
        from deepspeed.runtime.zero import GatheredParameters, register_external_parameter

        from mckd.models import access

        params = [access.get_input_embeddings(module.student).weight,
                  access.get_output_head(module.student).weight, *module.criterion.parameters()]
        for p in params:
            if hasattr(p, "ds_id"):
                register_external_parameter(module, p)

        def teacher_ctx(view):
            if view is None:
                return contextlib.nullcontext()
            return GatheredParameters([view.embed_tokens.weight, view.lm_head.weight], modifier_rank=None)

        module.criterion_context = teacher_ctx

    def autocast(self):
        return contextlib.nullcontext()  # the module itself is in the training dtype

    def loss_scale(self, total_tokens: torch.Tensor) -> torch.Tensor:
        return self.world * self.gas / total_tokens.clamp_min(1)

    def forward(self, batch: dict, teacher_view, *, last: bool) -> CriterionOutput:
        return CriterionOutput(*self.engine(batch, teacher_view))

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        self.engine.backward(loss)
        self.engine.step()  # applies the optimizer only at the accumulation boundary

    def finish_step(self) -> tuple[float, bool]:
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = bool(getattr(self.engine, "skipped_steps", 0) > getattr(self, "_skipped", 0))
        self._skipped = getattr(self.engine, "skipped_steps", 0)
        return norm, skipped

    def lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def save(self, directory: str) -> None:
        """Optimizer/scheduler/module state in DeepSpeed's own (per-rank) format."""
        self.engine.save_checkpoint(directory, tag="deepspeed", save_latest=False)

    def load(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="deepspeed", load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"--resume: no DeepSpeed state under {directory}/deepspeed")

    def consolidated_student_state(self) -> dict | None:
        """Full 16-bit student weights (collective under ZeRO-3; every rank must call)."""
        if self.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.raw.state_dict()
        if sd is None:
            return None
        return {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}

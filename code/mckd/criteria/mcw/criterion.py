"""``mcw_kd``: Multi-Cost Wasserstein KD.

    loss_sum = CE_sum + kd_rate * KD_CMA_sum + w_logits * OT_logits + w_hidden * OT_hidden

* ``CE_sum``: token-summed cross-entropy of the student (weight 1 as published; ``--loss-combination
  interpolate`` gives ``(1 - kd_rate) * CE``).
* ``KD_CMA_sum``: the DSKD-CMA objective, computed by the shared pure function
  :func:`mckd.criteria.dual_space_kd_with_cma.cma_losses` with this criterion's ``query``/``s2t``/
  ``t2s`` projectors and the shared ``--kd-*``/``--cma-*`` options (``--cma-normalization published``
  for the published scaling).
* ``--mcw-exact-kl-weight w`` (``--exact-align``: w = 1) adds ``w * sum KL`` over the exactly aligned
  label positions, the teacher's distribution read in the student vocabulary through the
  shared-string map (:mod:`mckd.criteria.exact_kl`); off in both presets.
* ``OT_logits`` / ``OT_hidden``: batched multi-cost Sinkhorn terms (:mod:`mckd.criteria.mcw.ot`).
  Scaling (``--mcw-ot-scaling``): ``per_example`` adds ``mean_b OT_b`` (published; after the loop's
  division by the label-token count its weight is ~1/350 of CE's) and ``per_token`` adds
  ``sum_b n_b OT_b`` with ``n_b`` the label tokens of example ``b`` (after the division: the
  token-weighted mean of ``OT_b``, on the scale of per-token CE, so ``w_*`` mean what they say).

Trainable parts (sub-modules, optimised in the projector-lr group, saved in checkpoints): the ``ot``
projector (teacher hidden -> student space), the salience head ``Linear(D_s, 1)`` and the CMA
projectors. Buffers (saved and restored): the two cost-weight vectors (rule: :mod:`mckd.criteria.mcw.weights`) and
the schedule position ``progress = [optimizer step, total steps]``.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from mckd.criteria.base import Criterion, CriterionOutput, CriterionResources, ModelDims, ModelView, register_criterion
from mckd.criteria.common import (combine_losses, count_tokens, cross_entropy_sum, is_on_policy, label_mask,
                                  require_hidden, teacher_input_ids, teacher_labels)
from mckd.criteria.divergences import get_divergence
from mckd.criteria.dual_space_kd_with_cma import (CMA_DEFAULTS, CMA_PROJECTORS, CMAOptions, cma_kwargs,
                                                  cma_losses)
from mckd.criteria.exact_kl import exact_vocab_kl
from mckd.criteria.mcw.ot import (aligned_student_index, alignment_cost, cost_statistics, hidden_costs,
                                  interpolation_weight, logit_costs, multi_cost_ot, topk_distributions)
from mckd.criteria.mcw.presets import MCWOptions
from mckd.criteria.mcw.weights import simplex_qp_weights
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions
from mckd.models.projectors import build_projectors, load_projector_weights, run_projector
from mckd.ot.costs import span_iou_cost

logger = logging.getLogger(__name__)

LOGIT_COST_NAMES = ("l2", "kl", "salience")
HIDDEN_COST_NAMES = ("align", "ctx_l2", "ctx_cos")


@register_criterion("mcw_kd")
class MCWKD(Criterion):
    """Multi-Cost Wasserstein KD. See the module docstring and docs/mcw_kd.md."""

    needs_teacher = True
    needs_hidden = True
    teacher_modules = ("embed_tokens", "lm_head")
    # The published edit-distance DTW cost comes precomputed from the data pipeline. Only the
    # ``dtw`` alignment cost uses it; the instance attribute says whether this instance needs it.
    alignment = ("dtw",)
    cross_tokenizer = True

    def __init__(self, student_hidden: int, teacher_hidden: int, *, options: MCWOptions | None = None,
                 kd_rate: float = KD_DEFAULTS.kd_rate, loss_combination: str = KD_DEFAULTS.loss_combination,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 kd_objective: str = KD_DEFAULTS.kd_objective,
                 kd_temperature: float = KD_DEFAULTS.kd_temperature,
                 teacher_temperature: float = KD_DEFAULTS.teacher_temperature,
                 tau_squared: bool = KD_DEFAULTS.kd_temperature_scaling,
                 adaptive_kl_alpha: float = KD_DEFAULTS.adaptive_kl_alpha,
                 skew_lambda: float = KD_DEFAULTS.skew_lambda, normalization: str = CMA_DEFAULTS.cma_normalization,
                 t2s_accuracy_mask: bool = CMA_DEFAULTS.cma_t2s_accuracy_mask,
                 projector_config_path: str | None = KD_DEFAULTS.projector_config_path,
                 projector_path: str | None = KD_DEFAULTS.projector_path,
                 tea2stu: torch.Tensor | None = None):
        """Args:
            student_hidden, teacher_hidden: D_s, D_t (from the model configs).
            options: :class:`MCWOptions` (a preset with overrides); None = the ``reference`` values.
            kd_rate: lambda of the CMA term (0 leaves the CMA term and its projectors out).
            loss_combination: ``published``/``additive`` (CE + l KD) or ``interpolate``.
            label_smoothing: CE label smoothing.
            kd_objective ... t2s_accuracy_mask: the DSKD-CMA options (shared ``--kd-*``/``--cma-*`` flags).
            projector_config_path: projector JSON (``ot`` and, with a CMA term, ``query``/``t2s``/``s2t``).
            projector_path: optional projector.pt to warm-start the projectors.
            tea2stu: (V_t,) teacher id -> student id with the same string or -1; needed when
                ``options.exact_kl_weight > 0``.
        """
        super().__init__()
        self.options = (options or MCWOptions()).validate()
        self.kd_rate = float(kd_rate)
        self.loss_combination = loss_combination
        self.label_smoothing = float(label_smoothing)
        self.alignment = ("dtw",) if self.options.align_cost == "dtw" else ()
        if self.options.exact_kl_weight > 0:
            if tea2stu is None:
                raise ValueError("mcw_kd: --mcw-exact-kl-weight needs the shared-string vocabulary map "
                                 "(both tokenizers)")
            tea2stu = torch.as_tensor(tea2stu, dtype=torch.long)
            shared_t = torch.nonzero(tea2stu >= 0).squeeze(1)
            # derived from the tokenizers: rebuilt at construction, not saved in checkpoints
            self.register_buffer("shared_t", shared_t, persistent=False)
            self.register_buffer("shared_s", tea2stu[shared_t], persistent=False)
            self.alignment = self.alignment + ("exact",)
        names = ("ot",) + (CMA_PROJECTORS if self.kd_rate != 0.0 else ())
        self.projectors = build_projectors(names, student_hidden, teacher_hidden, config_path=projector_config_path)
        if projector_path:
            load_projector_weights(self.projectors, projector_path)
        self.salience_head = nn.Linear(student_hidden, 1)
        self.cma_options = dict(kd_divergence=get_divergence(kd_objective, adaptive_kl_alpha=adaptive_kl_alpha,
                                                             skew_lambda=skew_lambda),
                                temperature=kd_temperature, teacher_temperature=teacher_temperature,
                                tau_squared=tau_squared, normalization=normalization,
                                t2s_accuracy_mask=t2s_accuracy_mask)
        self.register_buffer("weights_logits", torch.tensor(self.options.weights_logits, dtype=torch.float32))
        self.register_buffer("weights_hidden", torch.tensor(self.options.weights_hidden, dtype=torch.float32))
        self.register_buffer("progress", torch.zeros(2, dtype=torch.long))
        self.step, self.total_steps = 0, 0
        self._stat_sum: torch.Tensor | None = None    # (2, 3) local, reset at every weight update
        self._stat_count: torch.Tensor | None = None  # (2,)
        self.register_load_state_dict_post_hook(_sync_progress_after_load)

    @property
    def teacher_ranks(self) -> int:
        """The logit OT compares the teacher's top ``--mcw-top-k`` logits rank by rank."""
        return self.options.top_k

    @property
    def ot_projector(self) -> nn.Module:
        """Teacher hidden -> student space (``ot`` in configs/projector_config.json)."""
        return self.projectors["ot"]

    # ------------------------------------------------------------------ construction from the CLI
    option_groups = (KDOptions, CMAOptions, MCWOptions)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims,
                     resources: CriterionResources | None = None) -> "MCWKD":
        if dims.teacher_hidden is None:
            raise ValueError("mcw_kd: needs a teacher (--teacher-model-path); teacher hidden size unknown")
        kw = cma_kwargs(options, resources)
        kw.pop("projector_pretraining", None)
        options = options[MCWOptions]
        if options.exact_kl_weight > 0:
            from mckd.criteria.dual_space_kd_v2 import shared_map_tensor

            kw["tea2stu"] = shared_map_tensor(resources, dims, "mcw_kd")
        return cls(dims.student_hidden, dims.teacher_hidden, options=options, **kw)

    # ------------------------------------------------------------------ schedule and weight rule
    def set_progress(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = int(step), int(total_steps)
        self.progress[0], self.progress[1] = self.step, self.total_steps

    def interpolation_t(self) -> float:
        """Teacher share of the interpolated logit target at the current optimizer step."""
        return interpolation_weight(self.step, self.total_steps, self.options.interp_start)

    def after_optimizer_step(self, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Every ``update_interval`` optimizer steps: rank-averaged statistics -> QP -> new weights."""
        interval = self.options.update_interval
        if interval <= 0 or (self.step + 1) % interval != 0:
            return {}
        dev = self.weights_logits.device
        sums = self._stat_sum if self._stat_sum is not None else torch.zeros(2, 3, device=dev)
        counts = self._stat_count if self._stat_count is not None else torch.zeros(2, device=dev)
        sums, counts = all_reduce_mean(sums.clone()), all_reduce_mean(counts.clone())
        means = sums / counts.clamp_min(1e-12)[:, None]                                 # (2, 3)
        qp = simplex_qp_weights(means, sigma=self.options.qp_sigma, floor=self.options.qp_floor)
        m = self.options.weight_momentum
        old = torch.stack([self.weights_logits, self.weights_hidden]).float()
        new = torch.where(counts[:, None] > 0, m * old + (1.0 - m) * qp, old)          # no data: keep
        with torch.no_grad():
            self.weights_logits.copy_(new[0])
            self.weights_hidden.copy_(new[1])
        self._stat_sum, self._stat_count = None, None
        out = {f"mcw/w_logits_{n}": new[0, i] for i, n in enumerate(LOGIT_COST_NAMES)}
        out.update({f"mcw/w_hidden_{n}": new[1, i] for i, n in enumerate(HIDDEN_COST_NAMES)})
        return out

    def _accumulate(self, family: int, sums: torch.Tensor, count: torch.Tensor) -> None:
        if self._stat_sum is None:
            self._stat_sum = torch.zeros(2, 3, device=sums.device)
            self._stat_count = torch.zeros(2, device=sums.device)
        self._stat_sum[family] += sums.float()
        self._stat_count[family] += count.float()

    # ------------------------------------------------------------------ the loss
    def positions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher (B, T_t), student (B, T_s)) bool masks of the positions taking part in the OT."""
        if self.options.positions == "response":
            return label_mask(teacher_labels(batch)), label_mask(batch["labels"])
        t_att = batch.get("teacher_attention_mask", batch["attention_mask"])
        return t_att.bool(), batch["attention_mask"].bool()

    def ot_terms(self, batch: dict[str, torch.Tensor], student: ModelView, teacher: ModelView) -> dict:
        """Both OT terms. Returns per-example values (B,) ``ot_logits``/``ot_hidden`` (with gradient),
        the cost lists, plans and eps (for tests and statistics)."""
        o = self.options
        h_s = require_hidden(student, "student", "mcw_kd")                               # (B, T_s, D_s)
        h_t = require_hidden(teacher, "teacher", "mcw_kd")                               # (B, T_t, D_t)
        t_mask, s_mask = self.positions(batch)
        T_t, T_s = h_t.shape[1], h_s.shape[1]
        if teacher.logits.shape[1] != T_t or student.logits.shape[1] != T_s:
            raise ValueError(f"mcw_kd: logits and hidden lengths differ: student {tuple(student.logits.shape)} vs "
                             f"{tuple(h_s.shape)}, teacher {tuple(teacher.logits.shape)} vs {tuple(h_t.shape)}")
        g = run_projector(self.ot_projector, h_t.detach())                           # (B, T_t, D_s)
        sal_w = self.salience_head.weight.dtype
        with torch.autocast(device_type=h_s.device.type, enabled=False):
            align = alignment_cost(batch, o.align_cost, T_t, T_s)                       # (B, T_t, T_s)
            pairing = None
            if o.interp_pairing == "aligned":
                spans = align if o.align_cost == "span_iou" else span_iou_cost(batch["teacher_offsets"],
                                                                               batch["offsets"])
                pairing = aligned_student_index(spans, s_mask)                          # (B, T_t)
            p_s, p_t = topk_distributions(student.logits, teacher.logits, k=o.top_k, temperature=o.seq_temperature,
                                          t=self.interpolation_t(), pairing=pairing, detach_student=o.interp_detach,
                                          teacher_mask=t_mask, student_mask=s_mask)
            sal_s = torch.sigmoid(self.salience_head(h_s.to(sal_w)).squeeze(-1))        # (B, T_s)
            sal_t = torch.sigmoid(self.salience_head(g.to(sal_w)).squeeze(-1))          # (B, T_t)
            lc = logit_costs(p_t, p_s, sal_t, sal_s)
            hc = hidden_costs(g, h_s, t_mask, s_mask, align, o.window)
            kw = dict(epsilon=o.epsilon, epsilon_mode=o.epsilon_mode, n_iters=o.sinkhorn_iters, grad=o.sinkhorn_grad)
            ot_l = multi_cost_ot(lc, self.weights_logits, t_mask, s_mask, **kw)
            ot_h = multi_cost_ot(hc, self.weights_hidden, t_mask, s_mask, **kw)
        return dict(ot_logits=ot_l.value, ot_hidden=ot_h.value, logit_costs=lc, hidden_costs=hc,
                    plan_logits=ot_l.result.plan, plan_hidden=ot_h.result.plan, eps_logits=ot_l.epsilon,
                    eps_hidden=ot_h.epsilon, masks=(t_mask, s_mask),
                    marginal_error=torch.maximum(ot_l.result.marginal_error, ot_h.result.marginal_error))

    def cma_terms(self, batch: dict[str, torch.Tensor], student: ModelView, teacher: ModelView):
        """The DSKD-CMA terms (token sums) with this criterion's projectors."""
        return cma_losses(
            student_logits=student.logits, student_hidden=require_hidden(student, "student", "mcw_kd"),
            teacher_logits=teacher.logits, teacher_hidden=require_hidden(teacher, "teacher", "mcw_kd"),
            input_ids=batch["input_ids"], labels=batch["labels"], teacher_input_ids=teacher_input_ids(batch),
            teacher_labels=teacher_labels(batch), student_embed=student.embed_tokens,
            teacher_embed=teacher.embed_tokens, student_head_weight=student.lm_head_weight,
            teacher_head_weight=teacher.lm_head_weight, query_proj=self.projectors["query"],
            t2s_proj=self.projectors["t2s"], s2t_proj=self.projectors["s2t"], **self.cma_options)

    def scale_ot(self, values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example OT values (B,) -> the token-sum scale of ``loss_sum`` (``--mcw-ot-scaling``)."""
        if self.options.ot_scaling == "per_token":
            return (values * label_mask(labels).sum(1).to(values.dtype)).sum()
        return values.sum() / max(values.shape[0], 1)

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        if teacher is None:
            raise ValueError("mcw_kd: needs a teacher, but the loop passed teacher=None")
        o = self.options
        labels = batch["labels"]
        n_tokens = count_tokens(labels)
        ce, nll = cross_entropy_sum(student.logits, labels, self.label_smoothing)
        if is_on_policy(batch):   # the student's own samples: no reference to imitate
            ce = ce * 0.0
        metrics: dict[str, torch.Tensor] = {"nll_loss": nll.detach()}
        if self.kd_rate != 0.0:
            kd = self.cma_terms(batch, student, teacher)
            metrics.update(kd.metrics)
            base = combine_losses(ce, kd.kd, self.kd_rate, self.loss_combination, "additive")
            metrics["kd_loss"] = kd.kd.detach()
        else:
            base = ce if self.loss_combination != "interpolate" else (1.0 - self.kd_rate) * ce
        ot = self.ot_terms(batch, student, teacher)
        ot_l, ot_h = self.scale_ot(ot["ot_logits"], labels), self.scale_ot(ot["ot_hidden"], labels)
        loss = base + o.w_logits * ot_l + o.w_hidden * ot_h
        if o.exact_kl_weight > 0:
            if "exact_teacher_index" not in batch:
                raise KeyError("mcw_kd: --mcw-exact-kl-weight needs batch['exact_teacher_index']; build the "
                               "data with alignment=('exact',)")
            exact_kl, n_exact = exact_vocab_kl(student.logits, teacher.logits, labels, teacher_labels(batch),
                                               batch["exact_teacher_index"], self.shared_s, self.shared_t)
            loss = loss + o.exact_kl_weight * exact_kl
            metrics.update(exact_kl=exact_kl.detach(), exact_aligned_fraction=n_exact.float())
        t_mask, s_mask = ot["masks"]
        for fam, (costs, plan) in enumerate(((ot["logit_costs"], ot["plan_logits"]),
                                             (ot["hidden_costs"], ot["plan_hidden"]))):
            sums, count = cost_statistics(costs, plan, t_mask, s_mask, o.weight_statistic)
            self._accumulate(fam, sums, count)
            names = LOGIT_COST_NAMES if fam == 0 else HIDDEN_COST_NAMES
            prefix = "logits" if fam == 0 else "hidden"
            for i, n in enumerate(names):
                metrics[f"stat/c_{prefix}_{n}"] = sums[i] / count.clamp_min(1)
        metrics.update({
            "ot_logits": ot_l.detach(), "ot_hidden": ot_h.detach(),
            "stat/ot_logits_per_example": ot["ot_logits"].detach().mean(),
            "stat/ot_hidden_per_example": ot["ot_hidden"].detach().mean(),
            "stat/eps_logits": ot["eps_logits"].mean(), "stat/eps_hidden": ot["eps_hidden"].mean(),
            "stat/sinkhorn_marginal_error": ot["marginal_error"].max(),
            "stat/interp_t": torch.tensor(self.interpolation_t(), device=loss.device),
        })
        for i, n in enumerate(LOGIT_COST_NAMES):
            metrics[f"stat/w_logits_{n}"] = self.weights_logits[i].detach()
        for i, n in enumerate(HIDDEN_COST_NAMES):
            metrics[f"stat/w_hidden_{n}"] = self.weights_hidden[i].detach()
        return CriterionOutput(loss_sum=loss, n_tokens=n_tokens, metrics=metrics)


def _sync_progress_after_load(module: MCWKD, incompatible_keys) -> None:
    """After ``load_state_dict``: the schedule position comes back with the ``progress`` buffer."""
    module.step, module.total_steps = int(module.progress[0]), int(module.progress[1])

"""``min_edit_dis_kld``: MinED cross-tokenizer logit KD (FuseLLM-style alignment).

    loss = combine(CE_sum, sum_{labels != -100} KL_tau(q_aligned || p_s))

For every student label position ``j`` the target distribution ``q_aligned`` is

* the teacher's next-token logits at the teacher position ``i`` aligned to ``j``, moved into the
  student vocabulary through the MinED id map, when ``j`` is *aligned*:
  (a) the token DTW aligned exactly one teacher token to ``j`` (``batch["mined_teacher_index"]``,
  computed once per example by the data pipeline, :mod:`mckd.data.alignment`),
  (b) the student input id at ``j`` equals ``tea2stu[teacher input id at i]``, and
  (c) at least one transferred logit is above the fill value (the published "row max != -1e5");
* otherwise a one-hot target: logit 100 at the gold label, -1e5 elsewhere (so the KD term there
  is the CE at temperature tau).

Vocabulary transfer: the map ``tea2stu`` (teacher id -> student id) is inverted to
``stu2tea``: every student id in its image gets the *smallest* teacher id mapped to it
(``max_align_num = 1``); student ids outside the image get the fill logit -1e5, i.e. zero teacher
probability. The transfer is one gather of the ``K`` mapped teacher columns at the aligned teacher
positions (:func:`mined_transfer`). The published target over the whole student vocabulary (one
float scatter, :func:`dense_target_logits`; the published code built an int64 one-hot per position)
is never materialised in training: :func:`mined_kd_per_token` scatters the teacher
*probabilities* instead and uses the fused soft-target cross-entropy, which gives the same number
because the fill entries have probability 0.

``combine`` is the published ``(1 - l) CE + l KD``; ``--loss-combination additive`` selects
``CE + l KD``. Temperature ``--kd-temperature`` divides both sides, ``--kd-temperature-scaling``
adds the tau^2 factor (off as published). Differences from the published code: docs/mined.md.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from mckd.criteria.base import (Criterion, CriterionOutput, CriterionResources, ModelDims, ModelView,
                                register_criterion)
from mckd.criteria.common import (combine_losses, count_tokens, label_mask, masked_sum, safe_targets,
                                  teacher_input_ids, upcast)
from mckd.criteria.cross_entropy import sft_terms
from mckd.criteria.options import CriterionOptions, KD_DEFAULTS, KDOptions

logger = logging.getLogger(__name__)

FILL_LOGIT = -1e5    # logit of student ids that receive no teacher value (published constant)
GOLD_LOGIT = 100.0   # logit of the gold id in the one-hot fallback target (published constant)
INDEX_KEY = "mined_teacher_index"


def invert_vocab_map(tea2stu: torch.Tensor, student_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert teacher->student to student->first teacher id.

    Args:
        tea2stu: (V_t',) long, student id of every teacher id.
        student_vocab: V_s, size of the student logits.

    Returns:
        ``(teacher_ids, student_ids)``: two (K,) long tensors, K = number of distinct student ids
        in the image of ``tea2stu``; ``teacher_ids[k]`` is the smallest teacher id mapped to
        ``student_ids[k]``; ``student_ids`` ascending.
    """
    n_teacher = tea2stu.numel()
    first = torch.full((student_vocab,), n_teacher, dtype=torch.long, device=tea2stu.device)
    first.scatter_reduce_(0, tea2stu, torch.arange(n_teacher, device=tea2stu.device), reduce="amin")
    student_ids = torch.nonzero(first < n_teacher).squeeze(1)
    return first[student_ids], student_ids


def mined_transfer(teacher_logits: torch.Tensor, teacher_index: torch.Tensor,
                   student_input_ids: torch.Tensor, teacher_input_ids: torch.Tensor,
                   labels: torch.Tensor, tea2stu: torch.Tensor,
                   stu2tea_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditions (a)-(c) and the teacher logits moved to the student vocabulary.

    Args:
        teacher_logits: (B, T_t, V_t) teacher logits (no gradient is taken through them).
        teacher_index: (B, T_s) long, aligned teacher input position of each student position or -1.
        student_input_ids: (B, T_s) long.
        teacher_input_ids: (B, T_t) long.
        labels: (B, T_s) long, ``-100`` = ignored.
        tea2stu: (V_t',) long teacher id -> student id.
        stu2tea_teacher: (K,) long, from :func:`invert_vocab_map`.

    Returns:
        ``(cols, aligned)``: cols (B, T_s, K) fp32 (fp64 for fp64 logits), the teacher logit of
        ``stu2tea_teacher[k]`` at the teacher position aligned to each student position, i.e. the
        value that student id ``stu2tea_student[k]`` receives; 0 where not aligned (so that
        NaN/inf at unused teacher rows never reach values or gradients). aligned (B, T_s) bool.
    """
    B, T_s = labels.shape
    if teacher_index.shape != labels.shape or student_input_ids.shape != labels.shape:
        raise ValueError(f"min_edit_dis_kld: {INDEX_KEY} {tuple(teacher_index.shape)}, input_ids "
                         f"{tuple(student_input_ids.shape)} and labels {tuple(labels.shape)} must match")
    if teacher_logits.shape[:2] != teacher_input_ids.shape:
        raise ValueError(f"min_edit_dis_kld: teacher logits {tuple(teacher_logits.shape)} do not match "
                         f"teacher_input_ids {tuple(teacher_input_ids.shape)}")
    pos = teacher_index.clamp_min(0)                                          # (B, T_s)
    # (a) one-to-one DTW alignment on a label position
    aligned = label_mask(labels) & teacher_index.ge(0)
    # (b) the aligned teacher input token maps to the student input token
    t_ids = teacher_input_ids.gather(1, pos)                                  # (B, T_s)
    in_map = t_ids.lt(tea2stu.numel()) & t_ids.ge(0)
    mapped = tea2stu[t_ids.clamp(0, tea2stu.numel() - 1)]                    # (B, T_s)
    aligned = aligned & in_map & mapped.eq(student_input_ids)
    # one gather: the K mapped teacher columns (a 2-D index_select: the fast kernel), then the
    # aligned teacher rows (plain indexing; CPU index_select over rows was erratic under load)
    B_t, T_t, V_t = teacher_logits.shape
    flat = teacher_logits.detach().reshape(B_t * T_t, V_t).index_select(1, stu2tea_teacher)  # (B*T_t, K)
    rows = (pos + torch.arange(B, device=pos.device)[:, None] * T_t).reshape(-1)          # (B*T_s,)
    cols = upcast(flat[rows].view(B, T_s, -1))                                            # (B, T_s, K)
    # (c) at least one transferred logit above the fill value (False on NaN rows too)
    aligned = aligned & cols.amax(dim=-1).gt(FILL_LOGIT)
    cols = torch.where(aligned[..., None], cols, cols.new_zeros(()))
    return cols, aligned


def dense_target_logits(cols: torch.Tensor, aligned: torch.Tensor, labels: torch.Tensor,
                        stu2tea_student: torch.Tensor, student_vocab: int) -> torch.Tensor:
    """The published target logits over the whole student vocabulary.

    Transferred logits at ``stu2tea_student`` and -1e5 elsewhere on aligned rows; the one-hot
    fallback (100 at the label, -1e5 elsewhere) on the others. The loss does not need this tensor
    (:func:`mined_kd_per_token` works on the K mapped columns); it documents and tests the
    published formulation: one scatter on a float tensor.

    Args:
        cols: (B, T_s, K), aligned: (B, T_s) from :func:`mined_transfer`.
        labels: (B, T_s) long.
        stu2tea_student: (K,) long.
        student_vocab: V_s.

    Returns:
        (B, T_s, V_s) target logits, dtype of ``cols``.
    """
    B, T_s, _ = cols.shape
    fill = cols.new_full((), FILL_LOGIT)
    target = cols.new_full((B, T_s, student_vocab), FILL_LOGIT)
    target.index_copy_(-1, stu2tea_student, torch.where(aligned[..., None], cols, fill))
    gold = safe_targets(labels)[..., None]                                    # (B, T_s, 1)
    gold_value = torch.where(aligned[..., None], target.gather(-1, gold), fill.new_full((), GOLD_LOGIT))
    return target.scatter_(-1, gold, gold_value)


def mined_kd_per_token(student_logits: torch.Tensor, cols: torch.Tensor, aligned: torch.Tensor,
                       labels: torch.Tensor, stu2tea_student: torch.Tensor, temperature: float = 1.0,
                       tau_squared: bool = False) -> torch.Tensor:
    """Forward KL of the MinED target to the student at every position.

    Equal to ``forward_kl(student_logits, dense_target_logits(...), temperature=tau)`` (tested),
    computed without the target logits: a target entry of -1e5 has probability
    ``exp((-1e5 - max) / tau) / Z``, exactly 0 in fp32 for any tau below ~1000, so the target
    distribution ``w`` is ``q = softmax(cols / tau)`` scattered onto the K mapped student ids on
    aligned rows and the one-hot label elsewhere, and
    ``KL(w || p) = CE(w, p) - H(w) = cross_entropy(z_s / tau, w) + sum_k q_k log q_k``.
    One float scatter builds ``w``; the fused soft-target ``cross_entropy`` does the rest, so no
    teacher-side softmax over V_s is needed.

    Args:
        student_logits: (B, T_s, V_s).
        cols: (B, T_s, K), aligned: (B, T_s) from :func:`mined_transfer`.
        labels: (B, T_s) long.
        stu2tea_student: (K,) long student ids of the K columns.
        temperature: tau (both sides).
        tau_squared: multiply by tau^2.

    Returns:
        (B, T_s) fp32 (fp64 for fp64 logits); masking is the caller's.
    """
    B, T_s, V_s = student_logits.shape
    scale = 1.0 / temperature
    q = torch.softmax(cols * scale if temperature != 1.0 else cols, dim=-1)  # (B, T_s, K)
    q = q * aligned[..., None].to(q.dtype)                                    # 0 on one-hot rows
    neg_entropy = -torch.special.entr(q).sum(-1)                              # (B, T_s); 0 log 0 = 0
    w = cols.new_zeros(B * T_s, V_s)
    w.index_copy_(1, stu2tea_student, q.reshape(B * T_s, -1))                 # teacher rows
    w.scatter_add_(1, safe_targets(labels).reshape(-1, 1),                    # one-hot rows
                   (~aligned).reshape(-1, 1).to(w.dtype))
    z = upcast(student_logits).reshape(B * T_s, V_s)
    z = z * scale if temperature != 1.0 else z
    soft_ce = F.cross_entropy(z, w, reduction="none").view(B, T_s)
    value = soft_ce + neg_entropy
    return value * temperature ** 2 if tau_squared else value


@register_criterion("min_edit_dis_kld")
class MinEditDisKLD(Criterion):
    """MinED: forward KL to teacher logits transferred through a minimum-edit-distance vocab map.

    Args:
        tea2stu: teacher id -> student id for ids ``0 .. V_t' - 1``.
        student_vocab: V_s, size of the student logits (from the model config).
        teacher_vocab: V_t, size of the teacher logits (checked against the map), or None.
        kd_rate: lambda.
        kd_temperature: tau, on both sides.
        tau_squared: multiply the KL by tau^2.
        label_smoothing: eps of the CE term.
        loss_combination: ``published`` (= ``interpolate``), ``interpolate`` or ``additive``.
        source: where the map came from (for error messages).
    """

    published_combination = "interpolate"

    needs_teacher = True
    cross_tokenizer = True
    alignment = ("mined_dtw",)

    def __init__(self, tea2stu: Sequence[int] | torch.Tensor, student_vocab: int,
                 teacher_vocab: int | None = None, kd_rate: float = KD_DEFAULTS.kd_rate,
                 kd_temperature: float = KD_DEFAULTS.kd_temperature,
                 tau_squared: bool = KD_DEFAULTS.kd_temperature_scaling,
                 label_smoothing: float = KD_DEFAULTS.label_smoothing,
                 loss_combination: str = KD_DEFAULTS.loss_combination, source: str = "the vocabulary map"):
        super().__init__()
        tea2stu = torch.as_tensor(tea2stu, dtype=torch.long).flatten()
        if tea2stu.numel() == 0:
            raise ValueError(f"min_edit_dis_kld: {source} is empty")
        lo, hi = int(tea2stu.min()), int(tea2stu.max())
        if lo < 0 or hi >= student_vocab:
            raise ValueError(f"min_edit_dis_kld: {source} maps to student ids in [{lo}, {hi}], outside "
                             f"the student vocabulary 0..{student_vocab - 1}; was it built for another "
                             f"student model?")
        if teacher_vocab is not None and tea2stu.numel() > teacher_vocab:
            raise ValueError(f"min_edit_dis_kld: {source} has {tea2stu.numel()} teacher ids but the "
                             f"teacher logits have only {teacher_vocab}; was it built for another teacher?")
        if kd_temperature <= 0:
            raise ValueError(f"min_edit_dis_kld: --kd-temperature must be > 0, got {kd_temperature}")
        stu2tea_teacher, stu2tea_student = invert_vocab_map(tea2stu, student_vocab)
        # derived from the map file, so not saved in checkpoints
        self.register_buffer("tea2stu", tea2stu, persistent=False)
        self.register_buffer("stu2tea_teacher", stu2tea_teacher, persistent=False)
        self.register_buffer("stu2tea_student", stu2tea_student, persistent=False)
        self.student_vocab = int(student_vocab)
        self.kd_rate = kd_rate
        self.kd_temperature = kd_temperature
        self.tau_squared = tau_squared
        self.label_smoothing = label_smoothing
        self.loss_combination = loss_combination
        logger.info("min_edit_dis_kld: %d teacher ids -> %d distinct student ids (of %d)",
                    tea2stu.numel(), stu2tea_student.numel(), student_vocab)

    option_groups = (KDOptions,)

    @classmethod
    def from_options(cls, options: CriterionOptions, dims: ModelDims,
                     resources: CriterionResources | None = None) -> "MinEditDisKLD":
        from mckd.data.vocab_map import load_or_build_vocab_map

        kd = options[KDOptions]
        path = kd.teacher_to_student_id_mapping
        tok_t = getattr(resources, "teacher_tokenizer", None)
        tok_s = getattr(resources, "student_tokenizer", None)
        if not (path and os.path.isfile(path)) and (tok_t is None or tok_s is None):
            raise ValueError("min_edit_dis_kld: --teacher-to-student-id-mapping "
                             f"{path!r} does not exist and no tokenizers were given to build it")
        mapping, source = load_or_build_vocab_map(path, tok_t, tok_s)
        logger.info("min_edit_dis_kld: vocabulary map %s", source)
        return cls(mapping, student_vocab=dims.student_vocab, teacher_vocab=dims.teacher_vocab,
                   kd_rate=kd.kd_rate, kd_temperature=kd.kd_temperature,
                   tau_squared=kd.kd_temperature_scaling, label_smoothing=kd.label_smoothing,
                   loss_combination=kd.loss_combination, source=str(source))

    def forward(self, batch: dict[str, torch.Tensor], student: ModelView,
                teacher: ModelView | None) -> CriterionOutput:
        """Loss token sum, label-token count and metrics for one micro-batch.

        Batch keys: ``input_ids``, ``labels`` (B, T_s); ``teacher_input_ids`` (B, T_t);
        ``mined_teacher_index`` (B, T_s). ``student.logits`` (B, T_s, V_s), ``teacher.logits``
        (B, T_t, V_t).
        """
        if teacher is None:
            raise ValueError("min_edit_dis_kld: needs a teacher, but the loop passed teacher=None")
        if INDEX_KEY not in batch:
            raise KeyError(f"min_edit_dis_kld: the batch has no {INDEX_KEY!r}; the data pipeline must "
                           f"compute the 'mined_dtw' alignment (Criterion.alignment)")
        labels = batch["labels"]
        if student.logits.shape[-1] != self.student_vocab:
            raise ValueError(f"min_edit_dis_kld: student logits have {student.logits.shape[-1]} columns, "
                             f"the criterion was built for {self.student_vocab}")
        cols, aligned = mined_transfer(teacher.logits, batch[INDEX_KEY], batch["input_ids"],
                                       teacher_input_ids(batch), labels, self.tea2stu,
                                       self.stu2tea_teacher)
        mask = label_mask(labels)
        ce, metrics = sft_terms(student.logits, labels, self.label_smoothing, batch)
        per_token = mined_kd_per_token(student.logits, cols, aligned, labels, self.stu2tea_student,
                                       self.kd_temperature, self.tau_squared)  # (B, T_s)
        kd = masked_sum(per_token, mask)
        loss = combine_losses(ce, kd, self.kd_rate, self.loss_combination, published="interpolate")
        # token sums: the loop divides by the label-token count, so aligned_fraction is a fraction
        metrics.update(kd_loss=kd.detach(), loss=loss.detach(),
                       aligned_fraction=(aligned & mask).sum())
        return CriterionOutput(loss, count_tokens(labels), metrics)

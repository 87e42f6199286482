"""Criterion options: one frozen dataclass per group of flags, and the set a run was given.

A criterion lists the option groups it reads in ``Criterion.options`` (:class:`KDOptions` first
for the KD criteria) and is built from them by ``Criterion.from_options``. The training command
line accepts the flags of every group of every registered criterion (a group shared by several
criteria, such as the CMA options, is added once); :class:`CriterionOptions` holds the parsed
groups, and :meth:`CriterionOptions.values` flattens them to the ``{destination: value}`` record
written to ``args.json`` and read back by ``--config``.

A group is an :class:`OptionGroup` dataclass whose fields are declared with
:func:`mckd.options.opt`; a group with another flag scheme (MCW-KD's presets) overrides
:meth:`OptionGroup.add_args`, :meth:`OptionGroup.from_values` and :meth:`OptionGroup.values`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, TypeVar

from mckd.options import add_options, opt, values_of

KD_OBJECTIVES = ("forward_kl", "reverse_kl", "js_divergence", "skewed_forward_kl",
                 "skewed_reverse_kl", "adaptive_kl", "tvd")
LOSS_COMBINATIONS = ("published", "interpolate", "additive")

G = TypeVar("G", bound="OptionGroup")


class OptionGroup:
    """Base of an option-group dataclass: flags generated from its :func:`opt` fields."""

    @classmethod
    def add_args(cls, parser) -> None:
        add_options(parser, cls)

    @classmethod
    def from_values(cls: type[G], values: dict[str, Any]) -> G:
        """The group from parsed values (``{destination: value}``); absent ones keep their default."""
        return cls(**values_of(cls, values))

    def values(self) -> dict[str, Any]:
        """``{destination: value}``, the inverse of :meth:`from_values` (JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class KDOptions(OptionGroup):
    """knowledge distillation (shared by the KD criteria)"""

    kd_rate: float = opt(0.5, "lambda: weight of the KD term (how it combines with CE: "
                              "--loss-combination)")
    kd_temperature: float = opt(1.0, "tau for the KL-type objectives")
    kd_objective: str = opt("forward_kl", "divergence for various_divergence and the DSKD "
                                          "student-space term", choices=KD_OBJECTIVES)
    teacher_temperature: float = opt(1.0, "extra teacher temperature tau_t (DSKD-CMA "
                                          "teacher-to-student term)")
    label_smoothing: float = opt(0.0, "CE label smoothing")
    adaptive_kl_alpha: float = opt(0.5, "AKL head/tail threshold")
    skew_lambda: float = opt(0.1, "skew for skewed (reverse) KL")
    loss_combination: str = opt("published", "published: each criterion's published weighting "
                                "((1-l)*CE + l*KD for the DSKD-family baselines, CE + l*KD where "
                                "the published method used that); interpolate: (1-l)*CE + l*KD "
                                "for all; additive: CE + l*KD for all", choices=LOSS_COMBINATIONS)
    kd_temperature_scaling: bool = opt(False, "multiply temperature-scaled KL terms by tau^2 "
                                              "(Hinton et al.); off in the published code",
                                       action="store_true")
    projector_config_path: str | None = opt(None, "projector JSON (configs/projector_config.json)")
    projector_path: str | None = opt(None, "directory with a projector.pt to warm-start projectors")
    projector_lr: float = opt(0.001, "learning rate of the criterion's trainable parts "
                                     "(projectors, heads)")
    teacher_to_student_id_mapping: str | None = opt(None, "MinED vocabulary map (json teacher id "
                                                          "-> student id); built when missing")


#: The KD defaults as values: the criteria's constructors take their keyword defaults from here.
KD_DEFAULTS = KDOptions()


def option_groups(criterion_classes: Iterable[type]) -> list[type[OptionGroup]]:
    """The option groups of the given criterion classes, :class:`KDOptions` first, each once."""
    out: list[type[OptionGroup]] = [KDOptions]
    for cls in criterion_classes:
        for g in cls.option_groups:
            if g not in out:
                out.append(g)
    return out


class CriterionOptions:
    """The parsed option groups of a run, by class: ``options[KDOptions].kd_rate``."""

    def __init__(self, groups: Iterable[OptionGroup] = ()):
        self._groups = {type(g): g for g in groups}

    @classmethod
    def from_values(cls, values: dict[str, Any], groups: Iterable[type[OptionGroup]]) -> "CriterionOptions":
        return cls(g.from_values(values) for g in groups)

    def __getitem__(self, group: type[G]) -> G:
        """The group's options (its defaults when the run was given none of them)."""
        got = self._groups.get(group)
        return got if got is not None else group()

    def groups(self) -> list[OptionGroup]:
        return list(self._groups.values())

    def values(self) -> dict[str, Any]:
        """Every group's ``{destination: value}`` in one flat record (destinations are unique)."""
        out: dict[str, Any] = {}
        for g in self._groups.values():
            out.update(g.values())
        return out

    def replace(self, group: type[G], **changes) -> "CriterionOptions":
        """A copy with some values of one group changed."""
        new = CriterionOptions(self._groups.values())
        new._groups[group] = dataclasses.replace(self[group], **changes)
        return new

    def __eq__(self, other) -> bool:
        return isinstance(other, CriterionOptions) and self._groups == other._groups

    def __repr__(self) -> str:
        return f"CriterionOptions({', '.join(map(repr, self._groups.values()))})"

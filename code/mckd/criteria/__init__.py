"""Training criteria. Importing this package registers every criterion name.

Each criterion lives in its own module; add the import below when adding one.
"""
from mckd.criteria.base import (  # noqa: F401
    Criterion, CriterionOutput, CriterionResources, ModelDims, ModelView, get_criterion_class,
    known_criteria,
    register_criterion,
)

import importlib as _importlib

for _mod in ("cross_entropy", "various_divergence", "dual_space_kd", "dual_space_kd_with_cma",
             "universal_logit_distillation", "min_edit_dis_kld", "multi_level_ot", "mcw_kd"):
    try:
        _importlib.import_module(f"mckd.criteria.{_mod}")
    except ModuleNotFoundError as _e:  # modules arrive one by one during development
        if _e.name != f"mckd.criteria.{_mod}":
            raise

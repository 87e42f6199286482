"""Training criteria. Importing this package registers every criterion name.

Each criterion lives in its own module; add the import below when adding one.
"""
from mckd.criteria.base import (  # noqa: F401  (re-exported API)
    Criterion, CriterionOutput, CriterionResources, ModelDims, ModelView, get_criterion_class,
    known_criteria, register_criterion,
)
from mckd.criteria import (  # noqa: F401  (imported for their @register_criterion side effect)
    cross_entropy, dual_space_kd, dual_space_kd_v2, dual_space_kd_with_cma, dwa_kd, mcw, min_edit_dis_kld,
    multi_level_ot, uld_hybrid, universal_logit_distillation, various_divergence,
)

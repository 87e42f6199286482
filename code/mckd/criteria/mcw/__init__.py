"""MCW-KD (registry name ``mcw_kd``): the criterion, its batched multi-cost OT terms, the cost-weight
rule and the option presets."""
from mckd.criteria.mcw.criterion import MCWKD  # noqa: F401  (registers ``mcw_kd``)
from mckd.criteria.mcw.presets import MCWOptions  # noqa: F401

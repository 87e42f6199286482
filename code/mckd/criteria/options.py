"""Command-line options shared by several criteria (published flag names, spec section 9).

:mod:`mckd.config` calls :func:`add_kd_args` once, then every registered criterion's own
``add_args``. Criteria read these values in ``from_args`` and pass them on as flat keywords.
"""
from __future__ import annotations

KD_OBJECTIVES = ("forward_kl", "reverse_kl", "js_divergence", "skewed_forward_kl",
                 "skewed_reverse_kl", "adaptive_kl", "tvd")


def add_kd_args(parser) -> None:
    g = parser.add_argument_group("knowledge distillation (shared by the KD criteria)")
    g.add_argument("--kd-rate", type=float, default=0.5,
                   help="lambda: weight of the KD term (how it combines with CE: --loss-combination)")
    g.add_argument("--kd-temperature", type=float, default=1.0, help="tau for the KL-type objectives")
    g.add_argument("--kd-objective", type=str, default="forward_kl", choices=KD_OBJECTIVES,
                   help="divergence for various_divergence and the DSKD student-space term")
    g.add_argument("--teacher-temperature", type=float, default=1.0,
                   help="extra teacher temperature tau_t (DSKD-CMA teacher-to-student term)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="CE label smoothing")
    g.add_argument("--adaptive-kl-alpha", type=float, default=0.5, help="AKL head/tail threshold")
    g.add_argument("--skew-lambda", type=float, default=0.1, help="skew for skewed (reverse) KL")
    g.add_argument("--loss-combination", type=str, default="published",
                   choices=("published", "interpolate", "additive"),
                   help="published: each criterion's published weighting ((1-l)*CE + l*KD for the "
                        "DSKD-family baselines, CE + l*KD where the published method used that); "
                        "interpolate: (1-l)*CE + l*KD for all; additive: CE + l*KD for all")
    g.add_argument("--kd-temperature-scaling", action="store_true",
                   help="multiply temperature-scaled KL terms by tau^2 (Hinton et al.); off in the "
                        "published code")
    g.add_argument("--projector-config-path", type=str, default=None,
                   help="projector JSON (configs/projector_config.json)")
    g.add_argument("--projector-path", type=str, default=None,
                   help="directory with a projector.pt to warm-start projectors")
    g.add_argument("--projector-lr", type=float, default=0.001,
                   help="learning rate of the criterion's trainable parts (projectors, heads)")
    g.add_argument("--teacher-to-student-id-mapping", type=str, default=None,
                   help="MinED vocabulary map (json teacher id -> student id); built when missing")

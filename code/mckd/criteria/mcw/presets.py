"""MCW-KD options, the two presets (``reference`` and ``default``) and their command-line flags.

Every constant the published code hard-codes is a named option here. A preset
fills all of them; any single flag given on the command line overrides the preset's value
(``--mcw-preset reference --mcw-sinkhorn-iters 50`` is the published method with 50 iterations).

``reference`` reproduces the published formulas on identical inputs: attention-mask
positions, ETP with alpha 0.1 (eps = 10) and 100 unrolled iterations, position-wise interpolation
with non-detached student values, the edit-distance DTW alignment cost, OT terms added as
per-example means (so the loop's division by the label-token count scales them by ~1/350),
memoryless QP on mean costs every 1000 optimizer steps. The fixed bugs (crashes, the micro-batch
step counter, untrained salience head, per-rank weights) are fixed in both presets.

``default`` is our proposal (docs/mcw_kd.md gives the reasons): response positions, eps relative to
the mean cost, envelope gradient, interpolation paired by character alignment with a detached
student side, the offsets-based alignment cost (1 - IoU of character spans), per-token scaling of
the OT terms, and the scale-free plan-ratio statistic with momentum for the weights.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace

from mckd.criteria.mcw.weights import WEIGHT_STATISTICS, check_initial_weights
from mckd.criteria.options import OptionGroup
from mckd.ot.sinkhorn import GRAD_MODES

PRESETS = ("reference", "default")
POSITIONS = ("attention", "response")
EPSILON_MODES = ("absolute", "mean", "median")
INTERP_PAIRINGS = ("position", "aligned")
ALIGN_COSTS = ("dtw", "span_iou")
OT_SCALINGS = ("per_example", "per_token")


@dataclass(frozen=True)
class MCWOptions(OptionGroup):
    """Every MCW-KD hyper-parameter (flag names in brackets).

    Attributes:
        top_k: retained ranks of the logit distributions [--mcw-top-k, alias --top_k_vocab].
        seq_temperature: softmax temperature of the top-k distributions, published 2.0.
        window: half width of the context windows (published 4: up to 9 tokens).
        positions: "attention" (prompt + response, published) or "response" (label positions).
        epsilon_mode: "absolute" (eps = ``epsilon``) or "mean"/"median" (eps = ``epsilon`` x that
            statistic of each example's combined cost).
        epsilon: absolute eps, or the relative multiplier. Published: 1/alpha = 1/0.1 = 10.
        sinkhorn_iters: fixed Sinkhorn iteration count (published 100).
        sinkhorn_grad: "unrolled" (published) or "envelope".
        interp_start: t at step 0 of the teacher interpolation t = s + (1 - s) min(step/total, 1).
        interp_pairing: which student row is mixed into teacher row i: "position" (row i, published)
            or "aligned" (the student token with the largest character overlap).
        interp_detach: detach the student values inside the interpolated teacher.
        align_cost: hidden-level alignment cost: "dtw" (published edit-distance DTW, from the data
            pipeline) or "span_iou" (1 - IoU of character spans).
        ot_scaling: "per_example" (published: mean over examples, added to a token sum) or
            "per_token" (each example's OT value times its label-token count, so after the loop's
            division it is a token-weighted mean, on the scale of per-token CE).
        w_logits, w_hidden: weights of the two OT terms.
        weights_logits: initial weights of (L2, KL, salience).
        weights_hidden: initial weights of (alignment, context L2, context cosine).
        update_interval: optimizer steps between cost-weight updates (0: never).
        weight_statistic: "mean_cost" (published) or "plan_ratio" (see mckd.criteria.mcw.weights).
        weight_momentum: new = m * old + (1 - m) * QP solution (published 0).
        qp_sigma: proximal weight of the QP (published 2.0). qp_floor: minimum weight (0.01).
        exact_kl_weight: weight of a direct KL in the student vocabulary on exactly aligned label
            positions (:mod:`mckd.criteria.exact_kl`), added on top of the OT terms; 0 = off (both
            presets). Flag ``--mcw-exact-kl-weight`` (``--exact-align`` sets it to 1.0).
    """

    top_k: int = 400
    seq_temperature: float = 2.0
    window: int = 4
    positions: str = "attention"
    epsilon_mode: str = "absolute"
    epsilon: float = 10.0
    sinkhorn_iters: int = 100
    sinkhorn_grad: str = "unrolled"
    interp_start: float = 0.1
    interp_pairing: str = "position"
    interp_detach: bool = False
    align_cost: str = "dtw"
    ot_scaling: str = "per_example"
    w_logits: float = 1.0
    w_hidden: float = 1.0
    weights_logits: tuple = (0.2, 0.5, 0.3)
    weights_hidden: tuple = (0.3, 0.5, 0.2)
    update_interval: int = 1000
    weight_statistic: str = "mean_cost"
    weight_momentum: float = 0.0
    qp_sigma: float = 2.0
    qp_floor: float = 0.01
    exact_kl_weight: float = 0.0

    # flags: --mcw-preset and one --mcw-<option> per field, None meaning "the preset's value"
    @classmethod
    def add_args(cls, parser) -> None:
        add_mcw_args(parser)

    @classmethod
    def from_values(cls, values: dict) -> "MCWOptions":
        return options_from_values(values)

    def values(self) -> dict:
        """Every option as its ``mcw_<option>`` destination: read back by
        :func:`options_from_values` whatever the preset, so a saved run relaunches with exactly
        these options."""
        return {f"mcw_{k}": list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def validate(self) -> "MCWOptions":
        def bad(flag, msg):
            raise ValueError(f"--mcw-{flag.replace('_', '-')}: {msg}")
        for name, allowed in (("positions", POSITIONS), ("epsilon_mode", EPSILON_MODES),
                              ("sinkhorn_grad", GRAD_MODES), ("interp_pairing", INTERP_PAIRINGS),
                              ("align_cost", ALIGN_COSTS), ("ot_scaling", OT_SCALINGS),
                              ("weight_statistic", WEIGHT_STATISTICS)):
            if getattr(self, name) not in allowed:
                bad(name, f"{getattr(self, name)!r} is not one of {allowed}")
        if self.top_k < 1:
            bad("top_k", f"must be >= 1, got {self.top_k}")
        if self.seq_temperature <= 0 or self.epsilon <= 0:
            bad("epsilon" if self.epsilon <= 0 else "seq_temperature", "must be > 0")
        if self.sinkhorn_iters < 1:
            bad("sinkhorn_iters", "must be >= 1")
        if self.window < 0 or self.update_interval < 0:
            bad("window" if self.window < 0 else "update_interval", "must be >= 0")
        if not 0.0 <= self.interp_start <= 1.0 or not 0.0 <= self.weight_momentum < 1.0:
            bad("interp_start" if not 0 <= self.interp_start <= 1 else "weight_momentum", "out of range")
        if self.exact_kl_weight < 0:
            bad("exact_kl_weight", f"must be >= 0, got {self.exact_kl_weight}")
        if self.qp_sigma <= 0 or not 0 <= self.qp_floor * 3 <= 1:
            bad("qp_sigma" if self.qp_sigma <= 0 else "qp_floor", "out of range")
        check_initial_weights("--mcw-weights-logits", self.weights_logits)
        check_initial_weights("--mcw-weights-hidden", self.weights_hidden)
        return self


REFERENCE = MCWOptions()
DEFAULT = replace(
    REFERENCE,
    positions="response",
    epsilon_mode="mean",
    epsilon=0.1,
    sinkhorn_iters=50,
    sinkhorn_grad="envelope",
    interp_pairing="aligned",
    interp_detach=True,
    align_cost="span_iou",
    ot_scaling="per_token",
    update_interval=100,
    weight_statistic="plan_ratio",
    weight_momentum=0.5,
)
_PRESET_VALUES = {"reference": REFERENCE, "default": DEFAULT}


def preset(name: str, **overrides) -> MCWOptions:
    """Options of preset ``name`` with keyword overrides, validated."""
    if name not in _PRESET_VALUES:
        raise ValueError(f"--mcw-preset: unknown preset {name!r}; choose one of {PRESETS}")
    return replace(_PRESET_VALUES[name], **overrides).validate()



def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_mcw_args(parser) -> None:
    """``--mcw-preset`` plus one ``--mcw-<option>`` flag per :class:`MCWOptions` field (default None:
    take the preset's value)."""
    g = parser.add_argument_group("MCW-KD (mcw_kd); every option defaults to the preset's value")
    g.add_argument("--mcw-preset", type=str, default="default", choices=PRESETS,
                   help="reference: the published formulas; default: our measured choice (docs/mcw_kd.md)")
    for f in fields(MCWOptions):
        flag = "--mcw-" + f.name.replace("_", "-")
        extra = ("--top_k_vocab",) if f.name == "top_k" else ()
        kw: dict = dict(dest=f"mcw_{f.name}", default=None,
                        help=f"{f.name} (reference {getattr(REFERENCE, f.name)!r}, "
                             f"default {getattr(DEFAULT, f.name)!r})")
        if isinstance(f.default, tuple):
            kw.update(type=float, nargs=3, metavar="W")
        elif isinstance(f.default, bool):
            kw.update(type=_bool, metavar="true|false")
        else:
            kw["type"] = type(f.default)
        g.add_argument(flag, *extra, **kw)
    g.add_argument("--exact-align", dest="mcw_exact_align", action="store_true",
                   help="shorthand for --mcw-exact-kl-weight 1.0: exactly aligned positions get a direct "
                        "KL in the student vocabulary on top of the OT terms")


def options_from_values(values: dict) -> MCWOptions:
    """Preset named by ``values["mcw_preset"]`` (default ``default``) with every given
    ``mcw_<option>`` value (not None) applied; ``mcw_exact_align`` sets ``exact_kl_weight`` 1.0
    unless that is given."""
    overrides = {}
    if values.get("mcw_exact_align") and values.get("mcw_exact_kl_weight") is None:
        overrides["exact_kl_weight"] = 1.0
    for f in fields(MCWOptions):
        v = values.get(f"mcw_{f.name}")
        if v is not None:
            overrides[f.name] = tuple(v) if isinstance(f.default, tuple) else v
    return preset(values.get("mcw_preset") or "default", **overrides)

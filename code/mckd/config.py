"""Run configuration: typed dataclasses per subsystem, filled from the published command line.

Every flag keeps its published dashed name. A flag is declared once, as a field of one of the
dataclasses below (or of a criterion's option group, :mod:`mckd.criteria.options`), with
:func:`mckd.options.opt`; :func:`build_parser` turns the fields into argparse options,
:func:`parse_config` fills the dataclasses, validates them and resolves derived values
(:func:`finalize` adds the ones that need the dataset size and the world size), and
:func:`write_args_json` writes everything to ``<save-dir>/args.json`` before training starts.
``--config <run>/args.json`` starts from a saved configuration; flags given after it override
single values.

Criterion options: :func:`build_parser` adds the flags of the option groups of every registered
criterion (:func:`mckd.criteria.options.option_groups`); the parsed groups are
:attr:`Config.criterion_options`, from which the criterion is built.

Published flags that did nothing in the published code are accepted with a deprecation warning
so that published command lines still run; a few that every published script passes and whose
behaviour is now always on (``--do-train``, ``--do-valid``, ``--json-data``) are accepted silently.
Unknown flags are errors with a "did you mean" suggestion.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mckd.criteria.options import CriterionOptions, KDOptions
from mckd.options import add_options, cli_fields, finite_float, finite_floats, opt  # noqa: F401  (finite_float re-exported)

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
INTERVAL_UNITS = ("epoch", "step")
DDP_BACKENDS = ("auto", "nccl", "gloo")


class ConfigError(ValueError):
    """A bad command line or configuration; the message names the flag."""


# --------------------------------------------------------------------------- dataclasses
@dataclass
class ModelConfig:
    """Student and teacher models (local Hugging Face directories only)."""

    model_path: str | None = opt(None, "student HF directory (config.json, weights, tokenizer)")
    model_type: str | None = opt(None, "student family; read from config.json, a value given here "
                                       "is only checked against it")
    teacher_model_path: str | None = opt(None, "teacher HF directory; required by KD criteria")
    teacher_model_type: str | None = opt(None, "teacher family; read from config.json, only checked")
    teacher_cache: str | None = opt(None, "offline teacher cache directory (python -m mckd.teacher_cache "
                                          "build): teacher outputs are read from it and the teacher's "
                                          "weights are never loaded; with --teacher-model-path the cache "
                                          "is checked against that teacher")
    gradient_checkpointing: bool = opt(False, "HF gradient checkpointing on the student",
                                       action="store_true")
    criterion: str = opt("cross_entropy", "training criterion (registry name)")


@dataclass
class DataConfig:
    """Training/dev data and tokenisation lengths."""

    data_dir: str | None = opt(None, "directory with train.jsonl and dev.jsonl")
    task: str | None = opt(None, "task name (used by the scripts in output paths; recorded)")
    max_length: int = opt(1024, "maximum prompt+response length in tokens (per model)")
    max_prompt_length: int = opt(512, "maximum prompt length in tokens (keeps the response marker)")
    train_num: int = opt(-1, "use the first N training records (-1: all)")
    dev_num: int = opt(-1, "use the first N dev records for dev evaluation (-1: all)")
    num_workers: int = opt(1, "DataLoader worker processes")


@dataclass
class TrainingConfig:
    """Optimisation, schedule, precision, logging and checkpointing."""

    save_dir: str | None = opt(None, "output directory (args.json, logs, checkpoints)")
    overwrite: bool = opt(False, "start a new run in a non-empty --save-dir: the old directory is "
                                 "moved aside whole to <save-dir>.old-<date>", action="store_true")
    resume: bool = opt(False, "continue from the latest complete checkpoint in --save-dir",
                       action="store_true")
    seed: int = opt(1234, "random seed (each rank uses seed + rank for dropout; data order "
                          "uses the seed alone)")
    batch_size: int = opt(32, "micro-batch size per process")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    num_epochs: int | None = opt(None, "epochs (derived from --total-iters when unset)", type=int)
    total_iters: int | None = opt(None, "optimizer steps in total (derived from --num-epochs when "
                                        "unset)", type=int)
    max_steps: int | None = opt(None, "stop after this many optimizer steps (the schedule still "
                                      "spans the full run; for tests and smoke runs)", type=int)
    lr: float | None = opt(None, "student learning rate (AdamW)", type=float)
    lr_min: float = opt(1e-7, "final learning rate of the cosine/linear decay")
    weight_decay: float = opt(1e-2, "AdamW weight decay (never applied to biases and norm layers)")
    clip_grad: float = opt(1.0, "gradient-norm clipping (<= 0: off): one global norm over the "
                                "student and the criterion's trainable parts, or the student's "
                                "alone with --clip-grad-criterion")
    clip_grad_criterion: float | None = opt(None, "clip the criterion's trainable parts "
                                                  "(projectors) by their own gradient norm at this "
                                                  "value (<= 0: no clipping), apart from the "
                                                  "student's; plain torch engine only", type=float)
    warmup_iters: int = opt(0, "linear warmup in optimizer steps (honoured by every decay style)")
    lr_decay_style: str = opt("cosine", "learning-rate schedule after warmup",
                              choices=LR_DECAY_STYLES)
    precision: str | None = opt(None, "training precision: fp32, or bf16/fp16 mixed precision "
                                      "(default: the DeepSpeed config's, else fp32)",
                                choices=PRECISIONS)
    interval_unit: str = opt("epoch", "unit of --save-interval and --eval-interval",
                             choices=INTERVAL_UNITS)
    save_interval: int = opt(1, "save a checkpoint every N units (see --interval-unit); <= 0: "
                                "only at the end")
    eval_interval: int = opt(1, "evaluate on dev every N units; <= 0: only at the end")
    log_interval: int = opt(10, "optimizer steps between log lines")
    keep_best_n_checkpoints: int = opt(3, "keep the N best checkpoints by dev ROUGE-L (by dev loss "
                                          "without --eval-gen)")
    only_save_projector: bool = opt(False, "save only the criterion state (projectors), not the "
                                           "student", action="store_true")
    nan_patience: int = opt(3, "abort after this many consecutive non-finite losses (each is "
                               "skipped with a warning)")
    early_stop_patience: int = opt(0, "stop when the teacher-forced dev loss has not improved for "
                                      "N consecutive dev evaluations (0: off); the checkpoints "
                                      "kept are ranked by dev loss")
    divergence_threshold: float = opt(10.0, "stop when the step loss is more than this many times its "
                                            "moving mean for --divergence-patience steps in a row "
                                            "(0: off)")
    divergence_patience: int = opt(3, "consecutive far-above steps that count as divergence")
    on_policy_ratio: float = opt(0.0, "probability that a micro-batch's responses are replaced by "
                                      "the student's own samples, re-tokenised and aligned for "
                                      "the teacher on the fly (0: off-policy only)")
    on_policy_temperature: float = opt(1.0, "sampling temperature of the on-policy responses")
    on_policy_max_new_tokens: int | None = opt(None, "most tokens per on-policy response (default: "
                                                     "--max-length - --max-prompt-length)", type=int)


@dataclass
class DevConfig:
    """Dev evaluation during training and its generation settings."""

    eval_batch_size: int = opt(32, "dev evaluation batch size per process")
    eval_gen: bool = opt(False, "sample generations on dev and score ROUGE-L (checkpoints are "
                                "then ranked by ROUGE-L)", action="store_true")
    eval_gen_num: int = opt(-1, "dev examples that get sampled generations (-1: all of --dev-num)")
    eval_gen_repeat_times: int = opt(1, "sampled generation passes averaged per dev evaluation")
    eval_tqdm: bool = opt(False, "progress bars during dev evaluation", action="store_true")
    do_sample: bool = opt(False, "sample (else greedy)", action="store_true")
    top_k: int = opt(0, "sampling top-k (0: off)")
    top_p: float = opt(1.0, "nucleus p")
    temperature: float = opt(1.0, "sampling temperature")
    no_repeat_ngram_size: int = opt(6, "no-repeat n-gram size (also used for dev, unlike the "
                                       "published code)")
    repetition_penalty: float | None = opt(None, "repetition penalty", type=float)
    num_beams: int = opt(1, "beam count (greedy/sampling when 1)")
    max_new_tokens: int | None = opt(None, "new tokens per generation (default: --max-length - "
                                           "--max-prompt-length)", type=int)


@dataclass
class PeftConfig:
    """LoRA for the student (trained) and the teacher (loaded and merged)."""

    peft: str | None = opt(None, "parameter-efficient fine-tuning of the student", choices=("lora",))
    peft_lora_r: int = opt(16, "LoRA rank")
    peft_lora_alpha: int = opt(64, "LoRA alpha")
    peft_lora_dropout: float = opt(0.1, "LoRA dropout")
    peft_target_modules: str | None = opt(None, "comma-separated module names to adapt (default: "
                                                "PEFT's choice for the architecture)")
    peft_path: str | None = opt(None, "student LoRA adapter to continue training from")
    teacher_peft_path: str | None = opt(None, "teacher LoRA adapter, merged into the teacher")


@dataclass
class DistributedConfig:
    """Process group and DeepSpeed (world size, rank and local rank come from the environment)."""

    deepspeed: bool = opt(False, "train with DeepSpeed", action="store_true")
    deepspeed_config: str | None = opt(None, "DeepSpeed json (ZeRO stage, offload); batch, "
                                             "accumulation, clipping and precision are filled "
                                             "from our flags", flag="--deepspeed_config",
                                       aliases=("--deepspeed-config",))
    ddp_backend: str = opt("auto", "torch.distributed backend (auto: nccl on GPU, gloo on CPU)",
                           choices=DDP_BACKENDS)
    local_rank: int | None = opt(None, "set by launchers; the LOCAL_RANK env var wins",
                                 flag="--local_rank", type=int, aliases=("--local-rank",))


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "train": TrainingConfig, "eval": DevConfig,
    "peft": PeftConfig, "dist": DistributedConfig,
}

# Published flags kept for compatibility. value: (nargs, message). nargs 0 = flag, 1 = one value.
COMPAT_SILENT = {"--do-train": 0, "--do-valid": 0, "--json-data": 0}
DEPRECATED: dict[str, tuple[int, str]] = {
    **{f: (1, "had no effect in the published code") for f in (
        "--ckpt-name", "--n-gpu", "--n-nodes", "--model-parallel-size", "--dropout-path-rate",
        "--base-path", "--save-additional-suffix", "--eb-sample-times", "--processed-data-dir",
        "--data-process-workers", "--train-ratio", "--dev-ratio", "--gen-num", "--prompt-type",
        "--min-prompt-length", "--prompt-data-dir", "--pretrain-data-dir", "--seed-order",
        "--seed-data", "--seed-ppo", "--seed-lm", "--training-epochs", "--attn-dtype",
        "--loss-scale", "--lr-decay-iters", "--scheduler-name", "--peft-name", "--teacher-peft-name",
        "--hidden-dim-student", "--hidden-dim-teacher", "--max-student-len", "--max-teacher-len",
        "--vocab-alignment-path", "--teacher-to-student-token-mapping",
        "--student-to-teacher-token-mapping", "--student-to-teacher-id-mapping",
        "--train-iters-per-epoch", "--data-names", "--pretrained-projector",
        "--pretrained-projector-lr")},
    **{f: (0, "had no effect in the published code") for f in (
        "--teacher-model-fp16", "--no-value", "--save-rollout", "--force-process",
        "--force-process-demo", "--bin-data", "--txt-data", "--eval-ppl", "--eval-rw",
        "--only-prompt", "--fp32")},
    # --debug is no longer one of these: it shows tracebacks (see code/distillation.py)
    "--model-dtype": (1, "weights are loaded once in the dtype of --precision"),
    "--do-eval": (0, "run code/evaluate.py on the saved checkpoint instead"),
}
REMOVED = {
    "--model-parallel": "model parallelism is not supported (it raised NotImplementedError)",
    "--load": "use --resume (continue a run) or --model-path / --peft-path (start from weights); "
              "the published --load swapped the student after the optimizer was built",
}


CONFIG_FLAG = "--config"
# settings of an invocation, not of a run: never taken from a saved args.json
NOT_RELAUNCHED = {"train": ("resume", "overwrite"), "dist": ("local_rank",)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits; we raise so callers and tests see a ConfigError
        raise ConfigError(message)


def _section_dest(section: str):
    return lambda name: f"{section}.{name}"


def build_parser(with_criteria: bool = True) -> argparse.ArgumentParser:
    """The full command line of ``code/distillation.py``.

    Args:
        with_criteria: also add the flags of every registered criterion's option groups.
    """
    parser = _Parser(prog="distillation.py", allow_abbrev=False,
                     description="Train a student by SFT or knowledge distillation (see docs/training.md).")
    parser.add_argument(CONFIG_FLAG, metavar="ARGS_JSON", dest="load.config", default=None,
                        help="start from the configuration saved in a run's args.json (flags given "
                             "after it override single values; --resume and --overwrite are never "
                             "taken from it)")
    for section, cls in SECTIONS.items():
        add_options(parser, cls, title=section, description=cls.__doc__.splitlines()[0],
                    dest=_section_dest(section))
    compat = parser.add_argument_group("published flags kept for compatibility (see docs/training.md)")
    for flag, nargs in COMPAT_SILENT.items():
        compat.add_argument(flag, action="store_true", dest=f"compat.{flag}", help=argparse.SUPPRESS)
    for flag, (nargs, _msg) in DEPRECATED.items():
        kw = dict(action="store_true") if nargs == 0 else dict(default=None)
        compat.add_argument(flag, dest=f"deprecated.{flag}", help=argparse.SUPPRESS, **kw)
    for flag in REMOVED:
        compat.add_argument(flag, dest=f"removed.{flag}", nargs="?", const=True, default=None,
                            help=argparse.SUPPRESS)
    if with_criteria:
        add_criterion_args(parser)
    finite_floats(parser)
    return parser


def criterion_option_groups() -> list[type]:
    """The option groups of every registered criterion (shared groups once)."""
    import mckd.criteria as criteria
    from mckd.criteria.options import option_groups

    return option_groups(criteria.get_criterion_class(n) for n in criteria.known_criteria())


def add_criterion_args(parser: argparse.ArgumentParser) -> None:
    """The flags of every registered criterion's option groups."""
    for group in criterion_option_groups():
        try:
            group.add_args(parser)
        except argparse.ArgumentError as e:
            raise ConfigError(f"option group {group.__name__} ({group.__module__}) declares a flag "
                              f"that clashes with another one: {e}") from e


def _all_option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


@dataclass
class Config:
    """The parsed, validated run configuration."""

    model: ModelConfig
    data: DataConfig
    train: TrainingConfig
    eval: DevConfig
    peft: PeftConfig
    dist: DistributedConfig
    criterion_options: CriterionOptions = field(default_factory=CriterionOptions)
    derived: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of ``args.json``: one object per section, ``criterion_options`` with
        every option group's values under their flag destinations, the derived values, the argv."""
        out = {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}
        out["criterion_options"] = self.criterion_options.values()
        out["derived"] = dict(self.derived)
        out["argv"] = list(self.argv)
        return out


def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (the last one), or None."""
    path = None
    for i, a in enumerate(argv):
        if a == CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise ConfigError(f"{CONFIG_FLAG}: expected the path of a run's args.json")
            path = argv[i + 1]
        elif a.startswith(CONFIG_FLAG + "="):
            path = a.split("=", 1)[1]
    return path


def saved_defaults(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Parser defaults (``{destination: value}``) from a saved ``args.json``.

    Raises:
        ConfigError: naming the file, when it is missing, not JSON, or holds a setting this
            command line does not know.
    """
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{CONFIG_FLAG}: {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{CONFIG_FLAG}: {path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(s, {}), dict) for s in SECTIONS):
        raise ConfigError(f"{CONFIG_FLAG}: {path} is not a run's args.json (expected an object with "
                          f"the sections {', '.join(SECTIONS)})")
    dests = {a.dest for a in parser._actions}
    out: dict[str, Any] = {}
    for section in SECTIONS:
        for k, v in saved.get(section, {}).items():
            if k in NOT_RELAUNCHED.get(section, ()):
                continue
            if f"{section}.{k}" not in dests:
                raise ConfigError(f"{CONFIG_FLAG}: {path}: unknown setting {section}.{k}")
            out[f"{section}.{k}"] = v
    crit = saved.get("criterion_options", saved.get("criterion_args")) or {}
    for k, v in crit.items():
        if k not in dests:
            raise ConfigError(f"{CONFIG_FLAG}: {path}: unknown criterion option {k}")
        out[k] = v
    return out


def parse_config(argv: list[str] | None = None, *, check_paths: bool = True) -> Config:
    """Parse, apply compatibility rules, validate. Raises ConfigError naming the flag at fault.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        check_paths: verify that the given paths exist (tests of pure parsing turn it off).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    path = _config_path(argv)
    if path is not None:
        parser.set_defaults(**saved_defaults(path, parser))
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        known = _all_option_strings(parser)
        bad = [u.split("=", 1)[0] for u in unknown if u.startswith("-")] or unknown
        msgs = []
        for u in bad:
            close = difflib.get_close_matches(u, known, n=1, cutoff=0.6)
            msgs.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError("unrecognized arguments: " + ", ".join(msgs))
    values = vars(ns)
    sections: dict[str, dict] = {s: {} for s in SECTIONS}
    crit: dict[str, Any] = {}
    for key, val in values.items():
        head, _, name = key.partition(".")
        if head in sections and name:
            sections[head][name] = val
        elif head == "deprecated":
            if val not in (None, False):
                warnings.warn(f"{name} is deprecated and ignored: {DEPRECATED[name][1]}",
                              DeprecationWarning, stacklevel=2)
                logger.warning("%s is deprecated and ignored: %s", name, DEPRECATED[name][1])
        elif head == "removed":
            if val is not None:
                raise ConfigError(f"{name} is no longer supported: {REMOVED[name]}")
        elif head in ("compat", "load"):
            continue
        else:
            crit[key] = val
    try:
        options = CriterionOptions.from_values(crit, criterion_option_groups())
    except ValueError as err:  # a group's own checks (MCW-KD's presets) name the flag
        raise ConfigError(str(err)) from None
    cfg = Config(**{s: SECTIONS[s](**sections[s]) for s in SECTIONS}, criterion_options=options,
                 argv=argv)
    validate(cfg, check_paths=check_paths)
    resolve(cfg)
    return cfg


# --------------------------------------------------------------------------- validation
def _need(cond: bool, flag: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{flag}: {msg}")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Check values and paths; raise ConfigError naming the flag. Touches no file."""
    m, d, t, e, p, dist = cfg.model, cfg.data, cfg.train, cfg.eval, cfg.peft, cfg.dist
    _need(m.model_path is not None, "--model-path", "is required")
    _need(d.data_dir is not None, "--data-dir", "is required")
    _need(t.save_dir is not None, "--save-dir", "is required")
    _need(t.lr is not None and t.lr > 0, "--lr", f"must be a positive number (got {t.lr})")
    for flag, val in (("--batch-size", t.batch_size), ("--eval-batch-size", e.eval_batch_size),
                      ("--gradient-accumulation-steps", t.gradient_accumulation_steps),
                      ("--max-length", d.max_length), ("--max-prompt-length", d.max_prompt_length),
                      ("--log-interval", t.log_interval), ("--nan-patience", t.nan_patience),
                      ("--keep-best-n-checkpoints", t.keep_best_n_checkpoints),
                      ("--eval-gen-repeat-times", e.eval_gen_repeat_times),
                      ("--peft-lora-r", p.peft_lora_r), ("--num-beams", e.num_beams)):
        _need(val > 0, flag, f"must be positive (got {val})")
    for flag, val in (("--num-epochs", t.num_epochs), ("--total-iters", t.total_iters),
                      ("--max-steps", t.max_steps), ("--max-new-tokens", e.max_new_tokens)):
        _need(val is None or val > 0, flag, f"must be positive (got {val})")
    _need(d.max_prompt_length < d.max_length, "--max-prompt-length",
          f"({d.max_prompt_length}) must be smaller than --max-length ({d.max_length})")
    _need(t.warmup_iters >= 0, "--warmup-iters", "must be >= 0")
    _need(t.early_stop_patience >= 0, "--early-stop-patience", "must be >= 0")
    _need(not (t.early_stop_patience > 0 and t.eval_interval <= 0), "--early-stop-patience",
          "needs dev evaluations (--eval-interval > 0)")
    _need(not (t.clip_grad_criterion is not None and dist.deepspeed), "--clip-grad-criterion",
          "is not available under DeepSpeed (it clips one global norm, --clip-grad)")
    _need(t.divergence_threshold == 0 or t.divergence_threshold > 1, "--divergence-threshold",
          f"must be 0 (off) or > 1 (got {t.divergence_threshold})")
    _need(t.divergence_patience > 0, "--divergence-patience", "must be positive")
    for flag, val in (("--train-num", d.train_num), ("--dev-num", d.dev_num),
                      ("--eval-gen-num", e.eval_gen_num)):
        _need(val == -1 or val > 0, flag, f"must be -1 (all) or positive (got {val})")
    _need(e.top_k >= 0, "--top-k", "must be >= 0")
    _need(e.no_repeat_ngram_size >= 0, "--no-repeat-ngram-size", "must be >= 0")
    _need(e.repetition_penalty is None or e.repetition_penalty > 0, "--repetition-penalty",
          "must be positive")
    _need(p.peft_lora_alpha > 0, "--peft-lora-alpha", "must be positive")
    _need(t.weight_decay >= 0, "--weight-decay", "must be >= 0")
    _need(0 <= t.lr_min, "--lr-min", "must be >= 0")
    _need(d.num_workers >= 0, "--num-workers", "must be >= 0")
    _need(0.0 <= p.peft_lora_dropout < 1.0, "--peft-lora-dropout", "must be in [0, 1)")
    _need(not (t.resume and t.overwrite), "--resume", "cannot be combined with --overwrite")
    _need(0.0 < e.top_p <= 1.0, "--top-p", "must be in (0, 1]")
    _need(e.temperature > 0, "--temperature", "must be positive")
    _need(0.0 <= t.on_policy_ratio <= 1.0, "--on-policy-ratio", "must be in [0, 1]")
    _need(t.on_policy_temperature > 0, "--on-policy-temperature", "must be positive")
    _need(t.on_policy_max_new_tokens is None or t.on_policy_max_new_tokens > 0,
          "--on-policy-max-new-tokens", f"must be positive (got {t.on_policy_max_new_tokens})")
    _need(p.peft_path is None or p.peft == "lora", "--peft-path", "needs --peft lora")
    _need(not (dist.deepspeed and dist.deepspeed_config is None), "--deepspeed",
          "needs --deepspeed_config <json>")
    from mckd.criteria import get_criterion_class

    try:
        crit_cls = get_criterion_class(m.criterion)
    except KeyError as err:
        raise ConfigError(f"--criterion: {err.args[0]}") from None
    _need(not crit_cls.needs_teacher or m.teacher_model_path is not None or m.teacher_cache is not None,
          "--teacher-model-path", f"criterion {m.criterion!r} distils from a teacher: pass "
          "--teacher-model-path or --teacher-cache")
    validate_criterion_args(cfg.criterion_options.values(), crit_cls)
    _need(t.on_policy_ratio == 0 or crit_cls.needs_teacher, "--on-policy-ratio",
          f"criterion {m.criterion!r} uses no teacher to score the student's samples")
    _need(t.on_policy_ratio == 0 or m.teacher_cache is None, "--on-policy-ratio",
          "the student's samples need the live teacher (--teacher-model-path), not --teacher-cache")
    if not check_paths:
        return
    for flag, path in (("--model-path", m.model_path), ("--teacher-model-path", m.teacher_model_path),
                       ("--peft-path", p.peft_path), ("--teacher-peft-path", p.teacher_peft_path)):
        if path is not None:
            _need(os.path.isdir(path), flag, f"directory {path!r} does not exist")
    if m.teacher_cache is not None:
        _need(os.path.isfile(os.path.join(m.teacher_cache, "manifest.json")), "--teacher-cache",
              f"{m.teacher_cache!r} has no manifest.json (not a teacher cache; build one with "
              "python -m mckd.teacher_cache build)")
    _need(os.path.isfile(os.path.join(m.model_path, "config.json")), "--model-path",
          f"{m.model_path!r} has no config.json (not a Hugging Face model directory)")
    from mckd.models.tokenizers import TOKENIZER_FILES, has_tokenizer_files

    for flag, path in (("--model-path", m.model_path),
                       ("--teacher-model-path", m.teacher_model_path if crit_cls.needs_teacher else None)):
        if path is not None:
            _need(os.path.isfile(os.path.join(path, "config.json")), flag,
                  f"{path!r} has no config.json (not a Hugging Face model directory)")
            _need(has_tokenizer_files(path), flag, f"{path!r} has no tokenizer files (one of "
                  f"{', '.join(TOKENIZER_FILES)}); copy them from the model the weights came from")
    save = Path(t.save_dir)
    parent = next((q for q in (save, *save.parents) if q.exists()), None)
    _need(parent is not None and parent.is_dir(), "--save-dir",
          f"{t.save_dir!r} cannot be created: {parent} is not a directory")
    _need(os.access(parent, os.W_OK | os.X_OK), "--save-dir", f"{parent} is not writable")
    _need(os.path.isdir(d.data_dir), "--data-dir", f"directory {d.data_dir!r} does not exist")
    from mckd.data.examples import read_examples

    for split, limit in (("train", d.train_num), ("dev", d.dev_num)):
        f = os.path.join(d.data_dir, f"{split}.jsonl")
        _need(os.path.isfile(f), "--data-dir", f"{f} does not exist")
        read_examples(f, limit=limit)  # DataFormatError naming file and line, before anything is written
    if dist.deepspeed_config is not None:
        _need(os.path.isfile(dist.deepspeed_config), "--deepspeed_config",
              f"file {dist.deepspeed_config!r} does not exist")
    pc = cfg.criterion_options[KDOptions].projector_config_path
    if pc is not None:
        _need(os.path.isfile(pc), "--projector-config-path", f"file {pc!r} does not exist")


def validate_criterion_args(args: dict[str, Any], crit_cls: type) -> None:
    """Ranges of the shared KD options (and criterion options that follow their naming):
    rates and learning rates, temperatures, probabilities."""
    def val(name):
        return args.get(name)

    rate = val("kd_rate")
    if rate is not None:
        _need(rate >= 0, "--kd-rate", f"must be >= 0 (got {rate}); a negative rate trains away "
              "from the teacher")
        combination = val("loss_combination") or "published"
        interpolates = combination == "interpolate" or (
            combination == "published" and getattr(crit_cls, "published_combination", None) == "interpolate")
        _need(not interpolates or rate <= 1, "--kd-rate",
              f"must be <= 1 when CE and KD are interpolated as (1 - rate) CE + rate KD (got {rate}); "
              "use --loss-combination additive for CE + rate KD")
    for name, v in args.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        flag = "--" + name.replace("_", "-")
        if name.endswith("temperature"):
            _need(v > 0, flag, f"must be positive (got {v})")
        elif name.endswith("_lr"):
            _need(v > 0, flag, f"must be positive (got {v})")
        elif name.endswith("_rate") or name.endswith("_eps") or name.endswith("_iters"):
            _need(v >= 0, flag, f"must be >= 0 (got {v})")
    for name, lo, hi in (("label_smoothing", 0.0, 1.0), ("skew_lambda", 0.0, 1.0),
                         ("adaptive_kl_alpha", 0.0, 1.0)):
        v = val(name)
        if v is not None:
            _need(lo <= v < hi if name == "label_smoothing" else lo <= v <= hi,
                  "--" + name.replace("_", "-"), f"must be in [{lo:g}, {hi:g}{')' if name == 'label_smoothing' else ']'} (got {v})")


# Settings a resumed run may change (they do not alter what is learned or the data order);
# every other setting must equal the run's args.json.
RESUME_MAY_CHANGE: dict[str, frozenset] = {
    "train": frozenset({"save_dir", "max_steps", "log_interval",
                        "keep_best_n_checkpoints", "nan_patience", "divergence_threshold",
                        "divergence_patience", "save_interval", "eval_interval"}),
    "data": frozenset({"num_workers"}),
    "eval": frozenset({"eval_batch_size", "eval_tqdm"}),
    "dist": frozenset({"local_rank", "ddp_backend"}),
}


def _comparable(v: Any) -> Any:
    if isinstance(v, str) and os.path.exists(v):
        return os.path.realpath(v)
    if isinstance(v, (list, tuple)):
        return [_comparable(x) for x in v]
    return v


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """Compare a run's saved ``args.json`` with this command line.

    Returns:
        (refused, applied): ``"--flag old -> new"`` for every changed setting that a resume
        cannot honour, and for every changed one it applies (:data:`RESUME_MAY_CHANGE`).
    """
    now = cfg.to_dict()
    # a saved criterion record (older runs: "criterion_args") read as options, so that preset
    # values compare as the options they resolve to
    old_crit = saved.get("criterion_options", saved.get("criterion_args")) or {}
    try:
        old_crit = CriterionOptions.from_values(old_crit, criterion_option_groups()).values()
    except (TypeError, ValueError):
        pass  # compared value by value below
    saved = {**saved, "criterion_options": old_crit}
    refused, applied = [], []
    for section in (*SECTIONS, "criterion_options"):
        old, new = saved.get(section) or {}, now[section]
        for k, v in new.items():
            if k in ("resume", "overwrite") or k not in old or _comparable(old[k]) == _comparable(v):
                continue
            text = f"--{k.replace('_', '-')} {old[k]!r} -> {v!r}"
            (applied if k in RESUME_MAY_CHANGE.get(section, ()) else refused).append(text)
    return refused, applied


def load_deepspeed_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed_config: {path}:{err.lineno}: invalid JSON ({err.msg})") from None


def _ds_precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled", False):
        return "bf16"
    if ds.get("fp16", {}).get("enabled", False):
        return "fp16"
    return "fp32"


def resolve(cfg: Config) -> None:
    """Derived values that need no data: precision, dtypes, world size, git commit."""
    t, dist = cfg.train, cfg.dist
    ds_prec = None
    if dist.deepspeed and dist.deepspeed_config and os.path.isfile(dist.deepspeed_config):
        ds = load_deepspeed_json(dist.deepspeed_config)
        ds_prec = _ds_precision(ds)
        cfg.derived["zero_stage"] = int(ds.get("zero_optimization", {}).get("stage", 0))
        cfg.derived["zero_offload_optimizer"] = (
            ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none")
    if t.precision is None:
        t.precision = ds_prec or "fp32"
    elif ds_prec is not None and ds_prec != t.precision:
        logger.warning("--precision %s overrides the %s precision of %s", t.precision, ds_prec,
                       dist.deepspeed_config)
    # Plain torch keeps fp32 master weights and autocasts; DeepSpeed holds the module in the
    # training dtype (its optimizer keeps fp32 master copies), so it loads in that dtype once.
    compute = t.precision
    cfg.derived["compute_dtype"] = compute
    cfg.derived["student_load_dtype"] = compute if dist.deepspeed else "fp32"
    cfg.derived["teacher_load_dtype"] = compute
    env = os.environ
    cfg.derived["world_size"] = int(env.get("WORLD_SIZE", "1"))
    cfg.derived["rank"] = int(env.get("RANK", "0"))
    cfg.derived["local_rank"] = int(env.get("LOCAL_RANK", dist.local_rank if dist.local_rank is not None else 0))
    cfg.derived["effective_batch_size"] = (t.batch_size * t.gradient_accumulation_steps
                                           * cfg.derived["world_size"])
    cfg.derived["max_new_tokens"] = cfg.eval.max_new_tokens or (cfg.data.max_length
                                                                 - cfg.data.max_prompt_length)
    cfg.derived["on_policy_max_new_tokens"] = t.on_policy_max_new_tokens or (
        cfg.data.max_length - cfg.data.max_prompt_length)
    cfg.derived["git_commit"] = git_commit()


def finalize(cfg: Config, n_train: int) -> None:
    """Derived values that need the training-set size: iterations per epoch, total steps, epochs.

    ``iters_per_epoch = floor(n_train / (batch * world * accumulation))`` (partial groups at the
    end of an epoch are dropped, as in the published code).
    """
    t = cfg.train
    per_step = cfg.derived["effective_batch_size"]
    ipe = n_train // per_step
    if ipe < 1:
        raise ConfigError(f"--batch-size: {n_train} training examples are fewer than one optimizer "
                          f"step needs (batch {t.batch_size} x accumulation "
                          f"{t.gradient_accumulation_steps} x world {cfg.derived['world_size']})")
    if t.total_iters is None and t.num_epochs is None:
        raise ConfigError("--num-epochs: pass --num-epochs or --total-iters")
    if t.total_iters is None:
        total, epochs = ipe * t.num_epochs, t.num_epochs
    else:
        total, epochs = t.total_iters, math.ceil(t.total_iters / ipe)
        if t.num_epochs is not None and t.num_epochs < epochs:
            total = ipe * t.num_epochs
            epochs = t.num_epochs
    cfg.derived.update(n_train=n_train, iters_per_epoch=ipe, total_steps=total, num_epochs=epochs,
                       run_steps=min(total, t.max_steps) if t.max_steps else total)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_args_json(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full configuration (derived values included) as JSON, atomically."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)

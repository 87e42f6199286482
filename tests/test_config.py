"""Command line -> typed configuration: flags, validation, compatibility, derived values."""
from __future__ import annotations

import json
import warnings

import pytest

import test_train_support  # noqa: F401  (registers the stand-in criteria)
from mckd.config import (ConfigError, build_parser, finalize, parse_config, write_args_json)
from mckd.criteria.options import KDOptions


def _argv(tmp_path, *extra, data=True):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer_config.json").write_text("{}")  # validation wants tokenizer files
    d = tmp_path / "data"
    if data:
        test_train_support.write_data(d, 4, 2)
    return ["--model-path", str(model), "--data-dir", str(d), "--save-dir", str(tmp_path / "out"),
            "--lr", "5e-4", "--criterion", "test_ce", *extra]


def test_sections_and_published_names(tmp_path):
    cfg = parse_config(_argv(tmp_path, "--batch-size", "4", "--gradient-accumulation-steps", "2",
                             "--lr-decay-style", "linear", "--warmup-iters", "3", "--kd-rate", "0.7",
                             "--peft", "lora", "--peft-lora-r", "8", "--peft-target-modules", "c_attn"))
    assert cfg.train.batch_size == 4 and cfg.train.gradient_accumulation_steps == 2
    assert cfg.train.lr_decay_style == "linear" and cfg.train.warmup_iters == 3
    assert cfg.peft.peft == "lora" and cfg.peft.peft_lora_r == 8
    assert cfg.criterion_options[KDOptions].kd_rate == 0.7  # shared KD flags live with the criteria
    assert cfg.derived["effective_batch_size"] == 8
    assert cfg.train.precision == "fp32" and cfg.derived["student_load_dtype"] == "fp32"


def _settings_with_two_owners(parser) -> set[str]:
    """Setting names declared by more than one section or criterion (a dest is ``section.name``
    for the run sections, ``name`` for the criterion options; compatibility flags excluded)."""
    names = [a.dest.rsplit(".", 1)[-1] for a in parser._actions if a.option_strings
             and not a.dest.startswith(("compat.", "deprecated.", "removed."))]
    return {n for n in names if names.count(n) > 1}


def test_every_flag_has_one_owner():
    # argparse refuses two identical flags but not one setting under two flags in two sections,
    # which would give args.json two values for one name
    parser = build_parser()
    assert _settings_with_two_owners(parser) == set()
    parser.add_argument_group("other").add_argument("--other-lr", dest="other.lr", type=float)
    assert _settings_with_two_owners(parser) == {"lr"}
    seen = [s for a in parser._actions for s in a.option_strings]
    for flag in ("--model-path", "--teacher-model-path", "--save-interval", "--eval-interval",
                 "--interval-unit", "--precision", "--deepspeed", "--deepspeed_config", "--resume",
                 "--overwrite", "--nan-patience", "--eval-gen-num", "--dev-num", "--max-steps",
                 "--peft-path", "--teacher-peft-path", "--ddp-backend", "--num-workers",
                 "--keep-best-n-checkpoints", "--gradient-checkpointing", "--local_rank"):
        assert flag in seen, flag


def test_unknown_flag_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean '--lr-decay-style'"):
        parse_config(_argv(tmp_path, "--lr-decay-stlye", "cosine"))
    with pytest.raises(ConfigError, match="--ce_weight"):
        parse_config(_argv(tmp_path, "--ce_weight", "1.0"))


def test_no_abbreviations(tmp_path):
    with pytest.raises(ConfigError):
        parse_config(_argv(tmp_path, "--batch", "4"))


@pytest.mark.parametrize("extra,flag", [
    (("--batch-size", "0"), "--batch-size"),
    (("--gradient-accumulation-steps", "-1"), "--gradient-accumulation-steps"),
    (("--max-prompt-length", "600", "--max-length", "512"), "--max-prompt-length"),
    (("--lr-decay-style", "noam"), "--lr-decay-style"),
    (("--precision", "fp8"), "--precision"),
    (("--resume", "--overwrite"), "--resume"),
    (("--criterion", "test_cee"), "(?i)did you mean 'test_ce'"),
    (("--criterion", "test_kd"), "--teacher-model-path"),
    (("--deepspeed",), "--deepspeed"),
    (("--peft-path", "/nonexistent"), "--peft-path"),
    (("--load", "x"), "--load is no longer supported"),
    (("--model-parallel",), "--model-parallel"),
])
def test_bad_values_name_the_flag(tmp_path, extra, flag):
    with pytest.raises(ConfigError, match=flag):
        parse_config(_argv(tmp_path, *extra))


def test_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="--data-dir"):
        parse_config(_argv(tmp_path, data=False))
    argv = _argv(tmp_path)
    argv[1] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="--model-path"):
        parse_config(argv)
    with pytest.raises(ConfigError, match="--deepspeed_config"):
        parse_config(_argv(tmp_path, "--deepspeed", "--deepspeed_config", str(tmp_path / "x.json")))


def test_deprecated_flags_warn_but_run(tmp_path):
    with pytest.warns(DeprecationWarning, match="--teacher-model-fp16"):
        parse_config(_argv(tmp_path, "--teacher-model-fp16", "--ckpt-name", "x"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config(_argv(tmp_path, "--do-train", "--do-valid", "--json-data"))  # silent


def test_precision_follows_deepspeed_json_unless_given(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    cfg = parse_config(_argv(tmp_path, "--deepspeed", "--deepspeed_config", str(ds)))
    assert cfg.train.precision == "bf16" and cfg.derived["zero_stage"] == 2
    assert cfg.derived["student_load_dtype"] == "bf16"  # loaded once in the training dtype
    cfg = parse_config(_argv(tmp_path, "--deepspeed", "--deepspeed_config", str(ds), "--precision", "fp32"))
    assert cfg.train.precision == "fp32"
    cfg = parse_config(_argv(tmp_path, "--precision", "bf16"))  # plain torch: fp32 master + autocast
    assert cfg.derived["student_load_dtype"] == "fp32" and cfg.derived["teacher_load_dtype"] == "bf16"


def test_finalize_derives_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = parse_config(_argv(tmp_path, "--batch-size", "4", "--gradient-accumulation-steps", "2",
                             "--num-epochs", "3"))
    finalize(cfg, n_train=100)  # 100 // (4*2*2) = 6 steps per epoch
    assert cfg.derived["iters_per_epoch"] == 6 and cfg.derived["total_steps"] == 18
    cfg = parse_config(_argv(tmp_path, "--batch-size", "4", "--total-iters", "13"))
    finalize(cfg, n_train=100)  # 100 // 8 = 12 per epoch -> 2 epochs
    assert cfg.derived["num_epochs"] == 2 and cfg.derived["total_steps"] == 13
    with pytest.raises(ConfigError, match="--num-epochs"):
        finalize(parse_config(_argv(tmp_path)), n_train=100)
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        finalize(parse_config(_argv(tmp_path, "--batch-size", "64", "--num-epochs", "1")), n_train=100)


def test_args_json_is_complete(tmp_path):
    cfg = parse_config(_argv(tmp_path, "--num-epochs", "2", "--batch-size", "2"))
    finalize(cfg, n_train=10)
    write_args_json(cfg, tmp_path / "args.json")
    out = json.loads((tmp_path / "args.json").read_text())
    assert out["train"]["lr"] == 5e-4 and out["derived"]["total_steps"] == 10
    assert {"world_size", "effective_batch_size", "compute_dtype", "iters_per_epoch",
            "git_commit"} <= set(out["derived"])
    assert out["criterion_options"]["kd_temperature"] == 1.0


def _settings(cfg) -> dict:
    """Everything a run is configured with (not the derived values or the argv that gave it)."""
    out = cfg.to_dict()
    return {k: v for k, v in out.items() if k not in ("derived", "argv")}


def test_args_json_relaunches_the_same_configuration(tmp_path):
    """--config <run>/args.json gives back the configuration that wrote it, for every criterion's
    option groups (MCW-KD's preset values included); later flags override single values."""
    cfg = parse_config(_argv(tmp_path, "--num-epochs", "2", "--batch-size", "2", "--kd-rate", "0.3",
                             "--mcw-preset", "reference", "--mcw-sinkhorn-iters", "7",
                             "--mcw-weights-logits", "0.5", "0.25", "0.25", "--no-cma-t2s-accuracy-mask",
                             "--uld-hybrid-matched-weight", "0.2", "--mlot-variant", "published",
                             "--eval-gen", "--top-k", "5", "--peft", "lora", "--resume"))
    finalize(cfg, n_train=10)
    write_args_json(cfg, tmp_path / "args.json")
    again = parse_config(["--config", str(tmp_path / "args.json")])
    want = _settings(cfg)
    want["train"]["resume"] = False  # an invocation setting, never taken from the file
    assert _settings(again) == want
    assert again.criterion_options == cfg.criterion_options
    assert again.criterion_options.values()["mcw_sinkhorn_iters"] == 7
    changed = parse_config(["--config", str(tmp_path / "args.json"), "--lr", "1e-3",
                            "--mcw-top-k", "9", "--save-dir", str(tmp_path / "other")])
    assert changed.train.lr == 1e-3 and changed.train.save_dir == str(tmp_path / "other")
    assert changed.train.batch_size == 2 and changed.criterion_options[KDOptions].kd_rate == 0.3
    from mckd.criteria.mcw.presets import MCWOptions

    assert changed.criterion_options[MCWOptions].top_k == 9
    assert changed.criterion_options[MCWOptions].sinkhorn_iters == 7


@pytest.mark.parametrize("content,match", [
    ("{not json", r"args\.json:1: invalid JSON"),
    ('{"train": {"no_such_setting": 1}}', r"args\.json: unknown setting train\.no_such_setting"),
    ('{"criterion_options": {"no_such_option": 1}}', r"unknown criterion option no_such_option"),
    ('[1, 2]', "is not a run's args.json"),
])
def test_bad_config_file_names_the_file(tmp_path, content, match):
    (tmp_path / "args.json").write_text(content)
    with pytest.raises(ConfigError, match=match):
        parse_config(["--config", str(tmp_path / "args.json")], check_paths=False)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "none.json")], check_paths=False)


def test_constructor_defaults_are_the_option_defaults():
    """Each criterion's keyword default is the default of the option it stands for (stated once, in
    the option dataclass): a parameter ``x`` stands for the field ``x`` or ``<prefix>_x`` of
    KDOptions or one of the criterion's own option groups (``tau_squared``: kd_temperature_scaling)."""
    import dataclasses
    import inspect

    import mckd.criteria  # noqa: F401  (registers every criterion)
    from mckd.criteria.base import _REGISTRY

    checked = 0
    for name, cls in _REGISTRY.items():
        if cls.__module__.startswith("test_"):
            continue
        fields = {}
        for group in (KDOptions, *cls.option_groups):
            if dataclasses.is_dataclass(group):
                for f in dataclasses.fields(group):
                    fields.setdefault(f.name, f.default)
        fields["tau_squared"] = KDOptions().kd_temperature_scaling
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.default is inspect.Parameter.empty:
                continue
            match = [k for k in fields if k == p.name or k.endswith("_" + p.name)]
            if len(match) == 1:
                checked += 1
                assert p.default == fields[match[0]], (name, p.name, p.default, match[0], fields[match[0]])
    assert checked >= 40

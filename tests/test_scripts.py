"""Training scripts (scripts/gpt2, scripts/tinyllama, scripts/tiny) and DeepSpeed configs.

Every script runs in DRY_RUN mode: the printed command must parse with the real argument parser of
code/distillation.py, carry the published hyper-parameters, derive every path from the repository
it lives in, and follow the launch variables (GPUS, LAUNCHER, RESUME, overrides).
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mckd.criteria.mcw.presets import MCWOptions, preset
from mckd.criteria.options import KDOptions

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [p for d in ("gpt2", "tinyllama") for p in sorted((ROOT / "scripts" / d).glob("*.sh"))
           if not p.name.startswith("teacher_cache_")]  # cache builders: tests/test_teacher_cache.py

# script -> (criterion, student path tail, batch, accumulation, lr, epochs, kd rate or None, lora)
EXPECTED = {
    "gpt2/sft_teacher_qwen.sh": ("cross_entropy", "qwen/Qwen1.5-1.8B", 4, 2, 2e-5, 10, None, False),
    "gpt2/sft_gpt2_base.sh": ("cross_entropy", "gpt2/gpt2-base", 4, 2, 5e-4, 20, None, False),
    "gpt2/vanilla_kd_gpt2_base.sh": ("various_divergence", "gpt2/gpt2-base", 4, 2, 5e-4, 20, 0.5, False),
    "gpt2/dskd_gpt2_base.sh": ("dual_space_kd", "gpt2/gpt2-base", 4, 2, 5e-4, 20, 0.5, False),
    "gpt2/dskd_cma_gpt2_base.sh": ("dual_space_kd_with_cma", "gpt2/gpt2-base", 4, 2, 5e-4, 20, 0.5, False),
    "gpt2/minedit_gpt2_base.sh": ("min_edit_dis_kld", "gpt2/gpt2-base", 4, 2, 5e-4, 20, 0.5, False),
    "gpt2/uld_gpt2_base.sh": ("universal_logit_distillation", "gpt2/gpt2-base", 2, 4, 5e-4, 20, 0.5, False),
    "gpt2/multilevel_ot_gpt2_base.sh": ("multi_level_ot", "gpt2/gpt2-base", 4, 1, 5e-4, 20, 1.0, False),
    "gpt2/multicost_gpt2_base.sh": ("mcw_kd", "gpt2/gpt2-base", 4, 1, 5e-4, 20, 5.0, False),
    "gpt2/dskdv2_gpt2_base.sh": ("dual_space_kd_v2", "gpt2/gpt2-base", 8, 1, 5e-4, 20, 0.5, False),
    "gpt2/uld_hybrid_gpt2_base.sh": ("uld_hybrid", "gpt2/gpt2-base", 2, 4, 5e-4, 20, 1.0, False),
    "gpt2/dwa_kd_gpt2_base.sh": ("dwa_kd", "gpt2/gpt2-base", 4, 2, 5e-4, 20, 0.5, False),
    "tinyllama/sft_teacher_llama2.sh": ("cross_entropy", "llama2/llama2-7b-hf", 8, 1, 1e-3, 10, None, True),
    "tinyllama/sft_teacher_mistral.sh": ("cross_entropy", "mistral/mistral-7b-v0.1", 8, 1, 1e-3, 10, None, True),
    "tinyllama/sft_tinyllama.sh": ("cross_entropy", "tinyllama/tinyllama-1.1b-3T", 8, 1, 1e-3, 10, None, True),
    "tinyllama/vanilla_kd_tinyllama.sh": ("various_divergence", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 10, 0.5, True),
    "tinyllama/dskd_tinyllama.sh": ("dual_space_kd", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 10, 0.5, True),
    "tinyllama/dskd_cma_tinyllama.sh": ("dual_space_kd_with_cma", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 10, 0.5, True),
    "tinyllama/minedit_tinyllama.sh": ("min_edit_dis_kld", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 10, 0.5, True),
    "tinyllama/uld_tinyllama.sh": ("universal_logit_distillation", "tinyllama/tinyllama-1.1b-3T", 2, 4, 1e-3, 10, 0.5, True),
    "tinyllama/multilevel_ot_tinyllama.sh": ("multi_level_ot", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 15, 0.5, True),
    "tinyllama/multicost_tinyllama.sh": ("mcw_kd", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 15, 0.5, True),
    "tinyllama/dskdv2_tinyllama.sh": ("dual_space_kd_v2", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 10, 0.5, True),
    "tinyllama/uld_hybrid_tinyllama.sh": ("uld_hybrid", "tinyllama/tinyllama-1.1b-3T", 2, 4, 1e-3, 10, 1.0, True),
    "tinyllama/dwa_kd_tinyllama.sh": ("dwa_kd", "tinyllama/tinyllama-1.1b-3T", 4, 2, 1e-3, 10, 0.5, True),
}
# Variables a developer's shell might export that would change the defaults under test.
_SCRIPT_VARS = ("BASE_PATH", "GPUS", "LAUNCHER", "DEEPSPEED", "DS_CONFIG", "NNODES", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "NPROC", "RESUME", "OVERWRITE", "LR",
                "BATCH_SIZE", "GRAD_ACC", "EPOCH", "KD_RATE", "KD_TEMP", "KD_OBJ", "PRECISION",
                "CRITERION", "TEACHER_MODEL_PATH", "TEACHER_PEFT_PATH", "SAVE_PATH", "SETTING",
                "DATA_DIR", "CKPT_PATH", "EXTRA_ARGS", "CRITERION_ARGS", "TASK", "TEA2STU_ID_MAP",
                "TEACHER_CACHE", "TOP_K", "CACHE_DTYPE", "CACHE_BATCH_SIZE", "SHARD_SIZE", "CACHE_STORE")


def run_script(script: Path, *, check: bool = True, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
    e.update({"DRY_RUN": "1", "PYTHON": sys.executable}, **{k: str(v) for k, v in env.items()})
    proc = subprocess.run(["bash", str(script)], env=e, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    return proc


def split_command(stdout: str) -> tuple[list[str], list[str]]:
    """(launcher part, distillation.py arguments) of the single printed command line."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, stdout
    argv = shlex.split(lines[0])
    i = next(k for k, a in enumerate(argv) if a.endswith("code/distillation.py"))
    return argv[: i + 1], argv[i + 1:]


def parse(args: list[str]):
    from mckd.config import parse_config

    return parse_config(args, check_paths=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_parses_with_published_values(script):
    key = f"{script.parent.name}/{script.name}"
    crit, student, bs, gas, lr, epochs, kd_rate, lora = EXPECTED[key]
    launch, args = split_command(run_script(script, GPUS="0,1,2,3").stdout)
    assert launch[:3] == ["torchrun", "--nproc_per_node", "4"]
    assert launch[-1] == str(ROOT / "code" / "distillation.py")
    cfg = parse(args)
    ns = cfg.criterion_options[KDOptions]
    assert cfg.model.criterion == crit
    assert cfg.model.model_path == str(ROOT / "model_hub" / student)
    assert (cfg.train.batch_size, cfg.train.gradient_accumulation_steps) == (bs, gas)
    assert cfg.train.lr == pytest.approx(lr) and cfg.train.num_epochs == epochs
    assert cfg.train.seed == 10 and cfg.train.keep_best_n_checkpoints == 1
    assert cfg.data.max_length == 512 and cfg.data.max_prompt_length == 256
    assert cfg.data.data_dir == str(ROOT / "data" / "dolly")
    assert cfg.dist.deepspeed and Path(cfg.dist.deepspeed_config).is_file()
    assert Path(cfg.dist.deepspeed_config).parent == ROOT / "configs" / "deepspeed"
    assert (cfg.peft.peft == "lora") == lora
    if lora:
        assert (cfg.peft.peft_lora_r, cfg.peft.peft_lora_alpha) == (256, 8)
    # published layout: outputs/<model>/<size>/<task>/<setting>
    save = Path(cfg.train.save_dir)
    assert save.parents[3] == ROOT / "outputs" and str(save.parents[1]).endswith(student)
    assert save.name.startswith(f"criterion={crit}__")
    if kd_rate is None:
        assert cfg.model.teacher_model_path is None
    else:
        assert ns.kd_rate == pytest.approx(kd_rate)
        assert cfg.model.teacher_model_path.startswith(str(ROOT))
        # the LoRA teachers are base model + SFT adapter; full-FT teachers are SFT checkpoints
        if lora:
            assert cfg.model.teacher_model_path.startswith(str(ROOT / "model_hub"))
            assert cfg.peft.teacher_peft_path.startswith(str(ROOT / "outputs"))
        else:
            assert cfg.model.teacher_model_path.startswith(str(ROOT / "outputs"))
    if crit == "min_edit_dis_kld":
        assert ns.teacher_to_student_id_mapping.startswith(str(ROOT / "data" / "vocab_alignment"))
    if crit == "mcw_kd":
        # the default preset, with the scripts' --top_k_vocab where they pass one
        mcw = cfg.criterion_options[MCWOptions]
        assert mcw.top_k in (300, 400) and mcw == preset("default", top_k=mcw.top_k)


def _commands(text: str) -> str:
    """A script without its comment lines, blank lines and indentation: what bash runs."""
    lines = (line.strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("#"))


def test_scripts_are_not_copies_of_each_other():
    assert _commands("# a\n  x=1  \n\n# b\ny") == _commands("#!/bin/bash\nx=1\n  # c\ny") != _commands("x=2\ny")
    by_commands: dict[str, list[str]] = {}
    for p in SCRIPTS:
        by_commands.setdefault(_commands(p.read_text()), []).append(p.name)
    copies = [names for names in by_commands.values() if len(names) > 1]
    assert not copies, f"scripts that differ only in comments: {copies}"
    assert set(EXPECTED) == {f"{p.parent.name}/{p.name}" for p in SCRIPTS}
    for p in SCRIPTS:
        text = p.read_text()
        assert "lib/common.sh" in text and "mckd_train" in text
        assert "path_to" not in text and "RANDOM" not in text
        assert subprocess.run(["bash", "-n", str(p)]).returncode == 0


def test_cpu_run_uses_plain_python_in_fp32():
    launch, args = split_command(run_script(ROOT / "scripts/gpt2/sft_gpt2_base.sh", GPUS="").stdout)
    assert launch == [sys.executable, str(ROOT / "code" / "distillation.py")]
    cfg = parse(args)
    assert not cfg.dist.deepspeed and cfg.train.precision == "fp32"
    launch, _ = split_command(run_script(ROOT / "scripts/gpt2/sft_gpt2_base.sh", GPUS="", NPROC=2).stdout)
    assert launch[:3] == ["torchrun", "--nproc_per_node", "2"]


def test_environment_overrides_and_setting_name():
    out = run_script(ROOT / "scripts/gpt2/dskd_cma_gpt2_base.sh", GPUS="0 1", LR="1e-4",
                     BATCH_SIZE=2, KD_RATE=0.9, KD_OBJ="reverse_kl", EPOCH=3,
                     TEACHER_MODEL_PATH="/models/qwen-sft", EXTRA_ARGS="--max-steps 7").stdout
    launch, args = split_command(out)
    assert launch[:3] == ["torchrun", "--nproc_per_node", "2"]
    cfg = parse(args)
    ns = cfg.criterion_options[KDOptions]
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.batch_size == 2
    assert cfg.train.num_epochs == 3 and cfg.train.max_steps == 7
    assert ns.kd_rate == pytest.approx(0.9) and ns.kd_objective == "reverse_kl"
    assert cfg.model.teacher_model_path == "/models/qwen-sft"
    name = Path(cfg.train.save_dir).name
    assert "kd^rate=0.9" in name and "reverse_kl-bf16" in name and "bsz=2x2x2=8" in name
    assert "lr=1e-4" in name and "epoch=3" in name


def test_deepspeed_launcher_multinode_and_resume():
    out = run_script(ROOT / "scripts/gpt2/sft_teacher_qwen.sh", GPUS="0,1", LAUNCHER="deepspeed",
                     HOSTFILE="/etc/hostfile", NNODES=2, MASTER_ADDR="node0", MASTER_PORT=1234,
                     RESUME=1).stdout
    launch, args = split_command(out)
    assert launch[0] == "deepspeed"
    for flag, val in (("--hostfile", "/etc/hostfile"), ("--num_nodes", "2"), ("--num_gpus", "2"),
                      ("--master_addr", "node0"), ("--master_port", "1234")):
        assert launch[launch.index(flag) + 1] == val
    cfg = parse(args)
    assert cfg.train.resume and not cfg.train.overwrite
    assert cfg.dist.deepspeed_config.endswith("ds_config_zero2_offload.json")
    assert cfg.train.precision == "fp16"
    launch, _ = split_command(run_script(ROOT / "scripts/gpt2/sft_teacher_qwen.sh", GPUS="2,3",
                                         LAUNCHER="deepspeed").stdout)
    assert launch[launch.index("--include") + 1] == "localhost:2,3"
    launch, _ = split_command(run_script(ROOT / "scripts/gpt2/sft_gpt2_base.sh", GPUS="0",
                                         NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.1").stdout)
    assert launch[launch.index("--node_rank") + 1] == "1"
    assert launch[launch.index("--master_addr") + 1] == "10.0.0.1"


def test_paths_follow_the_script_location(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    _, args = split_command(run_script(copy / "scripts/gpt2/uld_gpt2_base.sh", GPUS="0").stdout)
    cfg = parse(args)
    for p in (cfg.model.model_path, cfg.model.teacher_model_path, cfg.data.data_dir,
              cfg.train.save_dir, cfg.dist.deepspeed_config):
        assert p.startswith(str(copy)), p


def test_teacher_checkpoint_is_found_and_best_by_rouge(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    run = copy / "outputs/qwen/Qwen1.5-1.8B/sft/criterion=cross_entropy__x"
    for name, rouge in (("epoch1_step10", 20.0), ("epoch2_step20", 31.5), ("epoch3_step30", 25.0)):
        (run / name).mkdir(parents=True)
        (run / name / "trainer_state.json").write_text(json.dumps({"dev": {"rougeL": rouge}}))
    (run / ".tmp-epoch4_step40").mkdir()
    proc = run_script(copy / "scripts/gpt2/multicost_gpt2_base.sh", GPUS="0")
    _, args = split_command(proc.stdout)
    assert parse(args).model.teacher_model_path == str(run / "epoch2_step20")
    assert "warning" not in proc.stderr


def test_missing_teacher_and_busy_run_dir_stop_real_runs(tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    proc = run_script(copy / "scripts/gpt2/dskd_cma_gpt2_base.sh", check=False, GPUS="", DRY_RUN=0)
    assert proc.returncode == 2 and "sft_teacher_qwen.sh" in proc.stderr
    busy = tmp_path / "run"
    busy.mkdir()
    (busy / "train.log").write_text("old run\n")
    proc = run_script(copy / "scripts/gpt2/sft_gpt2_base.sh", check=False, GPUS="", DRY_RUN=0,
                      SAVE_PATH=busy)
    assert proc.returncode == 2 and "RESUME=1" in proc.stderr
    assert (busy / "train.log").read_text() == "old run\n"


def test_mined_reports_the_vocab_map_command():
    proc = run_script(ROOT / "scripts/tinyllama/minedit_tinyllama.sh", GPUS="0",
                      TEA2STU_ID_MAP="/nonexistent/map.json")
    assert "mckd.data.vocab_map" in proc.stderr and "/nonexistent/map.json" in proc.stderr


@pytest.mark.parametrize("criterion", ["cross_entropy", "various_divergence", "dual_space_kd",
                                       "dual_space_kd_with_cma", "min_edit_dis_kld",
                                       "universal_logit_distillation", "multi_level_ot", "mcw_kd"])
def test_tiny_stage_dry_run(criterion, tmp_path):
    teacher = "teacher_same_vocab" if criterion in ("various_divergence", "dual_space_kd") else "teacher"
    env = dict(CRITERION=criterion, TEACHER_MODEL_NAME=teacher,
               TEACHER_MODEL_PATH=tmp_path / f"outputs/tiny/{teacher}/sft/run/epoch1_step9")
    if criterion == "cross_entropy":
        env = dict(MODEL="teacher")
    proc = run_script(ROOT / "scripts/tiny/train.sh", **env)
    launch, args = split_command(proc.stdout)
    assert launch[0] == sys.executable  # CPU unless GPUS is set
    cfg = parse(args)
    ns = cfg.criterion_options[KDOptions]
    assert cfg.model.criterion == criterion and cfg.train.precision == "fp32"
    assert cfg.data.data_dir == str(ROOT / "data" / "tiny")
    assert Path(cfg.train.save_dir).parents[2] == ROOT / "outputs" / "tiny"
    if criterion == "cross_entropy":
        assert cfg.model.model_path == str(ROOT / "model_hub/tiny/teacher")
        assert cfg.model.model_type == "llama" and cfg.model.teacher_model_path is None
        return
    assert cfg.model.model_path == str(ROOT / "model_hub/tiny/student")
    assert cfg.model.teacher_model_type == ("gpt2" if teacher == "teacher_same_vocab" else "llama")
    needs_projector = criterion in ("dual_space_kd", "dual_space_kd_with_cma", "mcw_kd")
    assert (ns.projector_config_path is not None) == needs_projector
    # KD defaults: the criterion's row of scripts/tiny/methods.tsv
    sys.path.insert(0, str(ROOT / "scripts" / "tiny"))
    import compare

    row = next(m for m in compare.read_methods().values() if m.criterion == criterion)
    assert ns.kd_rate == row.kd_rate and ns.kd_temperature == row.kd_temp
    if criterion == "min_edit_dis_kld":
        assert ns.teacher_to_student_id_mapping.endswith("teacher_to_student.json")
        missing = tmp_path / "maps" / "t2s.json"
        proc = run_script(ROOT / "scripts/tiny/train.sh", **env, TEA2STU_ID_MAP=missing)
        assert "mckd.data.vocab_map" in proc.stderr and str(missing) in proc.stderr
        assert parse(split_command(proc.stdout)[1]).criterion_options[KDOptions].teacher_to_student_id_mapping == str(missing)


def test_tiny_scripts_are_valid_bash():
    for name in ("run.sh", "train.sh", "compare.sh", "tune.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "scripts/tiny" / name)]).returncode == 0


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_fill_and_validate(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    from mckd.config import _ds_precision
    from mckd.train.engine import fill_deepspeed_config

    raw = json.loads(path.read_text())
    assert raw["train_micro_batch_size_per_gpu"] == "auto" and raw["gradient_clipping"] == "auto"
    prec = _ds_precision(raw)
    expect = "bf16" if "bf16" in path.name else "fp32" if "fp32" in path.name else "fp16"
    assert prec == expect
    stage = 3 if "zero3" in path.name else 2 if "zero2" in path.name else 0 if "zero0" in path.name else 1
    filled = fill_deepspeed_config(raw, batch_size=4, grad_acc=2, world_size=1, clip_grad=1.0,
                                   precision=prec)
    ds = DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == stage and ds.train_batch_size == 8
    assert ds.gradient_clipping == 1.0
    assert (ds.zero_config.offload_optimizer is not None) == ("offload" in path.name)


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
    """scripts/tiny/run.sh in a copy of the project: build, teacher SFT, SFT and MCW-KD students
    with two paired seeds, evaluation and the table of paired differences, with tiny data and step
    counts (about a minute on CPU)."""
    copy = tmp_path / "project"
    for d in ("scripts", "code", "configs"):
        shutil.copytree(ROOT / d, copy / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
    env.update(PYTHON=sys.executable, SEEDS="1 2", EVAL_SEEDS="10", EVAL_NUM="4", BATCH_SIZE="8",
               BUILD_ARGS="--teacher-train-size 96 --train-size 48 --dev-size 8 --test-size 8",
               TEACHER_ARGS="--max-steps 3", STUDENT_ARGS="--max-steps 2",
               ARGS="--teacher-epoch 1 --max-epochs 1 --max-new-tokens 8")
    proc = subprocess.run(["bash", str(copy / "scripts/tiny/run.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = copy / "outputs" / "tiny"
    assert "| mcw_kd | 0 | 2 |" in proc.stdout and "Δ vs SFT" in proc.stdout
    assert (out / "run" / "table.md").read_text().strip() in proc.stdout
    with open(out / "run" / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("mcw_kd", "1"), ("mcw_kd", "2"), ("sft", "1"), ("sft", "2"), ("teacher", "")]
    for r in rows:
        args = json.loads((Path(r["ckpt"]).parent / "args.json").read_text())
        want = "teacher" if r["method"] == "teacher" else ""
        assert args["data"]["data_dir"] == str(copy / "data" / "tiny" / want).rstrip("/")
        assert (Path(r["ckpt"]) / "eval-n4" / "results.json").is_file()   # a 4-prompt subset
    kd_args = json.loads((out / "run/mcw_kd/seed1/args.json").read_text())
    assert kd_args["model"]["teacher_model_path"].startswith(str(out / "teacher/sft/run"))
    # a second call reuses every stage and evaluation and only re-prints the table
    again = subprocess.run(["bash", str(copy / "scripts/tiny/run.sh")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and again.stderr.count("reusing") == 5
    # an interrupted stage is resumed, a diverged one moved aside and retrained, from the states
    # the runs recorded
    from mckd.train.checkpoint import run_state, write_run_state

    write_run_state(out / "run/sft/seed1", "interrupted", step=1)
    write_run_state(out / "run/mcw_kd/seed2", "diverged", step=1, message="loss diverged")
    third = subprocess.run(["bash", str(copy / "scripts/tiny/run.sh")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "teacher teacher: reusing" in third.stderr
    assert "sft seed 1: resuming the unfinished run" in third.stderr
    assert "mcw_kd seed 2: the run is diverged; moved to" in third.stderr
    assert [p.name for p in (out / "run/mcw_kd").iterdir() if ".old-" in p.name]
    for stage in ("teacher/sft/run", "run/sft/seed1", "run/mcw_kd/seed2"):
        assert run_state(out / stage).status == "finished"


@pytest.mark.slow
def test_tinyllama_scripts_end_to_end_on_tiny_models(tmp_path, tiny_models):
    """scripts/tinyllama as published (LoRA teacher SFT, then LoRA DSKD-CMA student with the
    teacher's adapter merged) run for real on tiny Mistral/TinyLLaMA-config models on CPU."""
    from conftest import write_word_data

    data = write_word_data(tmp_path / "data", n_train=8, n_dev=2)
    common = dict(GPUS="", DATA_DIR=str(data), BATCH_SIZE="2", GRAD_ACC="1", EPOCH="1",
                  LORA_RANK="4", LORA_ALPHA="8", MAX_LENGTH="64", MAX_PROMPT_LENGTH="32",
                  DEV_NUM="2", EVAL_GEN="0", PRECISION="fp32", EXTRA_ARGS="--max-steps 2")
    base_env = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
    base_env.update(common, PYTHON=sys.executable)
    mistral, tinyllama = tiny_models("mistral"), tiny_models("tinyllama", seed=3)
    teacher_dir = tmp_path / "teacher"
    proc = subprocess.run(["bash", str(ROOT / "scripts/tinyllama/sft_teacher_mistral.sh")],
                          env={**base_env, "CKPT_PATH": str(mistral),
                               "SAVE_PATH": str(teacher_dir)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapters = sorted(teacher_dir.glob("epoch*_step*/adapter_config.json"))
    assert adapters, "the LoRA teacher SFT wrote no adapter checkpoint"
    student_dir = tmp_path / "student"
    proc = subprocess.run(["bash", str(ROOT / "scripts/tinyllama/dskd_cma_tinyllama.sh")],
                          env={**base_env, "CKPT_PATH": str(tinyllama),
                               "TEACHER_MODEL_PATH": str(mistral),
                               "TEACHER_PEFT_PATH": str(adapters[-1].parent),
                               "SAVE_PATH": str(student_dir)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(student_dir.glob("epoch*_step*/adapter_config.json"))
    rows = [json.loads(x) for x in (student_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any("t2s_ce_loss" in r and r["t2s_ce_loss"] > 0 for r in rows)

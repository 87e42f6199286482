"""Data parallelism and DeepSpeed give the loss curve of one big batch (CPU, gloo).

Reference: 1 process x batch 4 (torch engine). Compared, over the first 3 optimizer steps:
1 process x batch 2 x 2 accumulation steps, torchrun 2 processes x batch 2 (DDP), DeepSpeed
ZeRO 0/1/2/2+offload/3 (1 process x batch 2 x 2 accumulation), and the ``deepspeed`` launcher
with 2 ranks under ZeRO-3 with a teacher. Dropout is off so the runs compute the same function;
the tolerance (relative 1e-4 on the loss) covers summation-order differences compounded by Adam.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import test_train_support as sup

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TOL = 1e-4


def _env():
    return dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}:{ROOT / 'code'}", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _args(setup, out, *extra, batch=2, gas=1):
    model, data = setup
    argv = sup.train_argv(model, data, out, "--total-iters", str(STEPS), "--eval-interval", "0",
                          "--save-interval", "0", *extra)
    argv[argv.index("--batch-size") + 1] = str(batch)
    argv[argv.index("--gradient-accumulation-steps") + 1] = str(gas)
    return argv


def _run(launcher: list[str], argv: list[str]) -> None:
    res = subprocess.run([*launcher, *argv], env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _curve(out: Path) -> list[float]:
    rows = [r for r in sup.read_jsonl(out / "metrics.jsonl") if "split" not in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


PY = [sys.executable, "-m", "test_train_support"]


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    model = sup.no_dropout_copy(tiny_models("gpt2"), base / "model")
    data = sup.write_data(base / "data", n_train=16, n_dev=2)
    return model, data


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(PY, _args(setup, out, batch=4))
    return _curve(out)


def test_accumulation_and_ddp_match_big_batch(setup, reference, tmp_path):
    _run(PY, _args(setup, tmp_path / "acc", gas=2))
    assert _curve(tmp_path / "acc") == pytest.approx(reference, rel=TOL)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", _port(), "-m", "test_train_support"]
    _run(torchrun, _args(setup, tmp_path / "ddp"))
    assert _curve(tmp_path / "ddp") == pytest.approx(reference, rel=TOL)
    args = json.loads((tmp_path / "ddp" / "args.json").read_text())["derived"]
    assert args["world_size"] == 2 and args["effective_batch_size"] == 4


# ZeRO-1 is not a row: DeepSpeed runs stages 1 and 2 with one optimizer class (stage 2 adds the
# gradient partitioning), so stage 2 covers its code path
@pytest.mark.parametrize("zero", ["0", "2", "2-offload", "3"])
def test_deepspeed_zero_stages_match(setup, reference, tmp_path, zero):
    stage = int(zero[0])
    cfg = {"zero_optimization": {"stage": stage}}
    if zero.endswith("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    _run(PY, _args(setup, out, "--deepspeed", "--deepspeed_config", str(ds), gas=2,
                   ) + ["--save-interval", "0"])
    assert _curve(out) == pytest.approx(reference, rel=TOL)
    ckpt = next(out.glob("epoch*_step*"))  # final checkpoint loads as a plain HF model
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)


def test_deepspeed_launcher_two_ranks_zero3_with_teacher(setup, tmp_path, tiny_models):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", _port(), "--module", "test_train_support"]
    out = tmp_path / "kd"
    _run(launcher, _args(setup, out, "--deepspeed", "--deepspeed_config", str(ds), "--teacher-model-path",
                         str(tiny_models("gpt2", seed=1)), "--criterion", "test_kd", "--eval-gen",
                         "--eval-gen-num", "2", "--max-new-tokens", "4", "--eval-interval", "-1"))
    curve = _curve(out)
    assert all(x > 0 for x in curve)
    state = next(out.glob("epoch*_step*")) / "criterion.pt"
    import torch

    assert int(torch.load(state)["updates"]) == STEPS


def test_single_process_deepspeed_init_leaves_the_process_clean(monkeypatch):
    """In-process DeepSpeed runs (tests, notebooks, sweeps): init fills the rendezvous variables
    with a free port, cleanup unsets them and DeepSpeed's cached groups, so a second
    deepspeed.initialize in the same process and a launcher started afterwards begin clean."""
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.utils import groups

    from mckd import dist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for _ in range(2):
        dist.init_distributed("gloo", deepspeed=True)
        assert dist.is_initialized() and dist.world_size() == 1
        port = int(os.environ["MASTER_PORT"])
        assert 0 < port < 65536
        import deepspeed

        engine, *_ = deepspeed.initialize(model=torch.nn.Linear(2, 2), config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
        assert groups._get_data_parallel_group() is not None
        dist.cleanup()
        assert not dist.is_initialized()
        assert groups._WORLD_GROUP is None and groups._DATA_PARALLEL_GROUP is None
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


def test_deepspeed_resume_reads_only_allow_listed_classes(setup, reference, tmp_path):
    """ZeRO-2 stopped after 2 steps and resumed: DeepSpeed's own files pass the safety scan and the
    curve is the uninterrupted one."""
    from mckd.train import checkpoint as ckpt_io

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    out = tmp_path / "run"
    argv = _args(setup, out, "--deepspeed", "--deepspeed_config", str(ds), gas=2) + [
        "--save-interval", "1", "--interval-unit", "step"]
    _run(PY, argv + ["--max-steps", "2"])
    ckpt_io.check_deepspeed_files(ckpt_io.latest_checkpoint(out) / "deepspeed")
    _run(PY, argv + ["--resume"])
    assert _curve(out) == pytest.approx(reference, rel=TOL)
    assert ckpt_io.run_state(out).status == "finished" and not (out / "run.lock").exists()

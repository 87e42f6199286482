"""End to end: the eval script on tiny models, results that add up, skip/overwrite, torchrun sharding,
LoRA adapters; plus checkpoint/data-file resolution."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT
from mckd.dist import DistContext
from mckd.evaluation.loading import CheckpointError, resolve_checkpoint
from mckd.evaluation.metrics import compute_metrics
from mckd.evaluation.runner import EvalConfig, pair_dir, resolve_data_file, run_evaluation

FAST = ["--dev-num", "4", "--max-new-tokens", "4"]


def _env(**kw):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    env.update(kw)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Evaluation sets in the published layout (``<dataset>/valid.jsonl``), generated records."""
    from mckd.tiny.tasks import generate_splits

    d = tmp_path_factory.mktemp("eval_data")
    for seed, name in enumerate(("dolly", "vicuna", "self-inst")):
        (d / name).mkdir()
        records = generate_splits({"teacher_train": 1, "dev": 1, "test": 8}, seed=seed)["test"]
        (d / name / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def _predictions(d):
    return [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]


def test_resolve_checkpoint_reads_family_from_config(tmp_path, monkeypatch):
    ckpt = tmp_path / "outputs" / "llama" / "x" / "y" / "z" / "epoch1_step1"  # path says llama: ignored
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        resolve_checkpoint(ckpt)
    (ckpt / "tokenizer.json").write_text("{}")
    info = resolve_checkpoint(ckpt)
    assert info.model_type == "gpt2" and not info.is_lora and info.model_dir == ckpt
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    monkeypatch.delenv("MODEL_PATH", raising=False)
    with pytest.raises(CheckpointError, match="not a local directory"):
        resolve_checkpoint(adapter)
    monkeypatch.setenv("MODEL_PATH", str(ckpt))
    info = resolve_checkpoint(adapter)
    assert info.is_lora and info.model_dir == ckpt and info.model_type == "gpt2"
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve_checkpoint(tmp_path / "missing")


def test_resolve_data_file_prefers_family_file(tmp_path):
    d = tmp_path / "dolly"
    d.mkdir()
    (d / "valid.jsonl").write_text("{}\n")
    assert resolve_data_file(tmp_path, "dolly", "gpt2") == d / "valid.jsonl"
    (d / "valid_qwen.jsonl").write_text("{}\n")
    assert resolve_data_file(tmp_path, "dolly", "qwen2") == d / "valid_qwen.jsonl"
    with pytest.raises(FileNotFoundError, match="vicuna"):
        resolve_data_file(tmp_path, "vicuna", "gpt2")


def test_lora_script_rejects_full_checkpoint(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts/eval/run_eval_lora.sh"), str(tmp_path), "2"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 2 and "adapter_config.json" in r.stderr


@pytest.mark.slow
def test_run_eval_script_two_datasets_two_seeds(tiny_models, data, tmp_path):
    ckpt = tmp_path / "run" / "epoch1_step5"
    shutil.copytree(tiny_models("gpt2"), ckpt)
    training_files = {"args.json": '{"lr": 1}\n', "train.log": "step 1\n"}
    for name, text in training_files.items():
        (ckpt.parent / name).write_text(text)
        (ckpt / name).write_text(text)
    r = subprocess.run(["bash", str(ROOT / "scripts/eval/run_eval.sh"), str(ckpt), "3", *FAST],
                       capture_output=True, text=True, timeout=300,
                       env=_env(GPUS="", DATASETS="dolly vicuna", SEEDS="10 20", DATA_DIR=str(data)))
    assert r.returncode == 0, r.stderr[-3000:]
    for name, text in training_files.items():  # nothing of the training run is overwritten
        assert (ckpt / name).read_text() == text and (ckpt.parent / name).read_text() == text
    out = ckpt / "eval"
    per_seed = {}
    for ds in ("dolly", "vicuna"):
        refs = [json.loads(line)["output"] for line in (data / ds / "valid.jsonl").read_text().splitlines()[:4]]
        for seed in (10, 20):
            d = pair_dir(out, ds, seed)
            preds = _predictions(d)
            assert [p["index"] for p in preds] == [0, 1, 2, 3]
            assert [p["references"] for p in preds] == [[x] if isinstance(x, str) else x for x in refs]
            m = json.loads((d / "metrics.json").read_text())
            assert {k: m[k] for k in ("rougeL", "exact_match")} == compute_metrics(
                [p["prediction"] for p in preds], [p["references"] for p in preds])
            assert m["avg_gen_len"] == pytest.approx(statistics.mean(p["gen_len"] for p in preds))
            assert all(p["gen_len"] <= 4 for p in preds) and m["settings"]["do_sample"] is True
            assert m["settings"]["top_k"] == 0 and m["settings"]["no_repeat_ngram_size"] == 6
            per_seed[(ds, seed)] = m
        assert _predictions(pair_dir(out, ds, 10)) != _predictions(pair_dir(out, ds, 20))  # seeds differ
    res = json.loads((out / "results.json").read_text())
    for ds in ("dolly", "vicuna"):
        vals = [per_seed[(ds, s)]["rougeL"] for s in (10, 20)]
        assert res["datasets"][ds]["rougeL_mean"] == pytest.approx(statistics.mean(vals), abs=1e-4)
        assert res["datasets"][ds]["rougeL_std"] == pytest.approx(statistics.stdev(vals), abs=1e-4)
    assert res["average"]["rougeL"] == pytest.approx(
        statistics.mean(res["datasets"][ds]["rougeL_mean"] for ds in ("dolly", "vicuna")), abs=1e-4)
    assert (out / "results.md").is_file() and "| dolly | 2 | 4 |" in r.stdout

    # Re-running skips finished pairs (nothing rewritten); --overwrite redoes; other settings conflict.
    cfg = EvalConfig(ckpt=str(ckpt), data_dir=str(data), datasets=["dolly", "vicuna"], seeds=[10, 20],
                     max_new_tokens=4, limit=4, batch_size=3)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("seed*/*")}
    run_evaluation(cfg, DistContext())
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("seed*/*")}
    with pytest.raises(RuntimeError, match="other settings"):
        run_evaluation(EvalConfig(**{**cfg.__dict__, "max_new_tokens": 3}), DistContext())
    cfg.datasets, cfg.seeds, cfg.overwrite = ["vicuna"], [20], True
    run_evaluation(cfg, DistContext())
    assert (pair_dir(out, "vicuna", 20) / "metrics.json").stat().st_mtime_ns != stamp[
        pair_dir(out, "vicuna", 20) / "metrics.json"]
    assert (pair_dir(out, "dolly", 10) / "metrics.json").stat().st_mtime_ns == stamp[
        pair_dir(out, "dolly", 10) / "metrics.json"]


@pytest.mark.slow
@pytest.mark.distributed
def test_greedy_two_processes_equal_one(tiny_models, data, tmp_path):
    ckpt = tiny_models("gpt2")
    two, one = tmp_path / "two", tmp_path / "one"
    r = subprocess.run(["bash", str(ROOT / "scripts/eval/run_eval.sh"), str(ckpt), "2", "--greedy",
                        "--dev-num", "5", "--max-new-tokens", "5", "--out-dir", str(two), "--no-lm-loss"],
                       capture_output=True, text=True, timeout=300,
                       env=_env(GPUS="", NPROC="2", DATASETS="self-inst", SEEDS="10", DATA_DIR=str(data)))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = EvalConfig(ckpt=str(ckpt), data_dir=str(data), datasets=["self-inst"], seeds=[10], greedy=True,
                     max_new_tokens=5, limit=5, batch_size=2, out_dir=str(one), lm_loss=False)
    run_evaluation(cfg, DistContext())
    p2, p1 = _predictions(pair_dir(two, "self-inst", 10)), _predictions(pair_dir(one, "self-inst", 10))
    assert [p["index"] for p in p2] == list(range(5))  # 3 batches over 2 ranks: each example once
    assert p2 == p1
    m2 = json.loads((pair_dir(two, "self-inst", 10) / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["settings"]["do_sample"] is False


@pytest.mark.slow
def test_lora_adapter_eval_matches_merged_model(tiny_models, data, tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from mckd.data.prompts import build_prompt_dataset
    from mckd.evaluation.generate import generate_batched
    from mckd.models.tokenizers import load_tokenizer

    base = tiny_models("llama2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    cfg_file = adapter / "adapter_config.json"
    cfg_json = json.loads(cfg_file.read_text())
    assert cfg_json["base_model_name_or_path"] == str(base)
    monkeypatch.delenv("MODEL_PATH", raising=False)
    cfg = EvalConfig(ckpt=str(adapter), data_dir=str(data), datasets=["vicuna"], seeds=[10], greedy=True,
                     max_new_tokens=4, limit=3, batch_size=2)
    run_evaluation(cfg, DistContext())
    m = json.loads((pair_dir(adapter / "eval-greedy", "vicuna", 10) / "metrics.json").read_text())
    assert m["settings"]["lora"] is True and m["settings"]["base_model"] == str(base.resolve())
    got = [p["prediction"] for p in _predictions(pair_dir(adapter / "eval-greedy", "vicuna", 10))]

    tok = load_tokenizer(str(base))
    prompts = [r["prompt_ids"] for r in build_prompt_dataset(data / "vicuna" / "valid.jsonl", tok, 256, limit=3)]
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, str(adapter)).merge_and_unload().eval()
    want = [tok.decode(x, skip_special_tokens=True).strip()
            for x in generate_batched(merged, tok, prompts, batch_size=2, max_new_tokens=4, do_sample=False)]
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_out = [tok.decode(x, skip_special_tokens=True).strip()
                for x in generate_batched(plain, tok, prompts, batch_size=2, max_new_tokens=4, do_sample=False)]
    assert got == want and got != base_out  # the adapter is applied (not the bare base model)

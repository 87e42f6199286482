"""The offline teacher cache: stored values, reconstruction, fingerprint refusal, missing or
truncated shards, what a criterion needs, and the resume of a build killed with SIGKILL."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import teacher_cache_support as tcs
from conftest import ROOT, run_distillation

from mckd.criteria.options import KDOptions
from mckd.teacher_cache.build import topk_entries
from mckd.teacher_cache.manifest import TeacherCacheError
from mckd.teacher_cache.shards import TeacherCacheReader, dense_logits, shard_name, verify_cache


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tcs.build_pair(tmp_path_factory.mktemp("tc_pair"))


@pytest.fixture(scope="module")
def cache(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("tc_cache") / "full"
    tcs.build(pair["teacher"], pair["data"], out)
    return out


# --------------------------------------------------------------------------- stored values
def test_topk_entries_and_dense_logits_reconstruct_the_distribution():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 40) * 4                                            # (B, T, V)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    # K = V: the logits come back exactly (padding rows are 0)
    e = topk_entries(z[mask], 40)
    full = {k: torch.zeros(2, 3, *v.shape[1:], dtype=v.dtype) for k, v in e.items()}
    for k, v in e.items():
        full[k][mask] = v
    rec = dense_logits(full["topk_values"], full["topk_ids"], full["logsumexp"], full["tail_logmass"], mask, 40)
    assert torch.equal(rec[mask], z[mask]) and torch.equal(rec[~mask], torch.zeros_like(rec[~mask]))
    assert torch.isinf(e["tail_logmass"]).all()
    # K < V: top-K log-probabilities exact, the tail mass spread uniformly over the other V - K ids
    K = 5
    e = topk_entries(z[mask], K)
    for k, v in e.items():
        full[k] = torch.zeros(2, 3, *v.shape[1:], dtype=v.dtype)
        full[k][mask] = v
    rec = dense_logits(full["topk_values"], full["topk_ids"], full["logsumexp"], full["tail_logmass"], mask, 40)
    lp, lp_rec = z[mask].log_softmax(-1), rec[mask].log_softmax(-1)
    ids = e["topk_ids"].long()
    assert torch.allclose(lp_rec.gather(-1, ids), lp.gather(-1, ids), atol=1e-5)
    tail = torch.ones_like(lp, dtype=torch.bool).scatter(-1, ids, False)
    p_tail = lp.exp().masked_fill(~tail, 0).sum(-1)
    assert torch.allclose(lp_rec.exp().masked_fill(~tail, 0).sum(-1), p_tail, atol=1e-6)
    rec_tail = lp_rec.masked_fill(~tail, float("nan"))
    assert torch.allclose(rec_tail.nanmean(-1), (p_tail / 35).log(), atol=1e-5)  # uniform
    # a tail that underflows stays finite
    lse = torch.zeros(1, 1)
    out = dense_logits(torch.zeros(1, 1, 2), torch.tensor([[[0, 1]]]), lse, torch.full((1, 1), -math.inf),
                       torch.ones(1, 1, dtype=torch.bool), 4)
    assert torch.isfinite(out).all() and out[0, 0, 2] == -1000


def test_cache_holds_the_teacher_outputs(pair, cache):
    """Each stored example equals the teacher's own forward on that example (fp32, all logits)."""
    from transformers import AutoModelForCausalLM

    from mckd.data import build_dataset
    from mckd.models.tokenizers import load_tokenizer

    reader = TeacherCacheReader(cache)
    m = reader.manifest
    assert m["complete"] and m["teacher"]["vocab_size"] == reader.top_k == reader.vocab
    tok = load_tokenizer(str(pair["teacher"]))
    ds = build_dataset(pair["data"] / "train.jsonl", student_tokenizer=tok, max_length=48, max_prompt_length=32)
    teacher = AutoModelForCausalLM.from_pretrained(str(pair["teacher"])).eval()
    assert sorted(reader.index) == sorted(ds.hf["example_index"])
    for i in (0, 5, len(ds) - 1):
        row = ds[i]
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            out = teacher(input_ids=ids, output_hidden_states=True)
        got = reader.example(row["example_index"])
        z = dense_logits(got["topk_values"][None], got["topk_ids"][None], got["logsumexp"][None],
                         got["tail_logmass"][None], torch.ones(1, ids.shape[1], dtype=torch.bool), reader.vocab)
        assert torch.allclose(z, out.logits, rtol=1e-5, atol=1e-5)
        assert torch.allclose(got["hidden"], out.hidden_states[-1][0], rtol=1e-5, atol=1e-5)
        assert got["input_ids"].tolist() == row["input_ids"]
    w = reader.teacher_weights()
    assert torch.equal(w["embed_tokens.weight"], teacher.get_input_embeddings().weight)
    assert torch.equal(w["lm_head.weight"], teacher.get_output_embeddings().weight)
    assert not m["lm_head_tied"]
    assert verify_cache(cache) == m["n_shards"] == 4


# --------------------------------------------------------------------------- refusal
def test_build_refuses_other_inputs_in_the_same_directory(pair, cache, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(cache, out)
    with pytest.raises(TeacherCacheError, match=r"top_k: cache \d+, this run 8") as e:
        tcs.build(pair["teacher"], pair["data"], out, top_k=8)
    assert "--overwrite" in str(e.value)
    with pytest.raises(TeacherCacheError, match="teacher_weights.*teacher_tokenizer"):
        tcs.build(pair["teacher_same_vocab"], pair["data"], out)
    with pytest.raises(TeacherCacheError, match="max_length: cache 48, this run 40"):
        tcs.build(pair["teacher"], pair["data"], out, max_length=40)
    assert tcs.build(pair["teacher"], pair["data"], out)["complete"]  # same inputs: nothing to do


def _argv(pair, save, *extra, criterion="dual_space_kd_with_cma", data=None):
    return ["--model-path", pair["student"], "--criterion", criterion, "--data-dir", data or pair["data"],
            "--save-dir", save, "--lr", "1e-3", "--batch-size", "2", "--total-iters", "1", "--max-length", "48",
            "--max-prompt-length", "32", "--precision", "fp32", "--eval-interval", "0", "--save-interval", "0",
            "--num-workers", "0", "--projector-config-path", ROOT / "configs" / "projector_config.json", *extra]


def test_training_refuses_a_stale_or_foreign_cache(pair, cache, tmp_path, capsys):
    # another data file
    data2 = tmp_path / "data2"
    shutil.copytree(pair["data"], data2)
    with open(data2 / "train.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    assert run_distillation(_argv(pair, tmp_path / "a", "--teacher-cache", cache, data=data2)) == 2
    err = capsys.readouterr().err
    assert "stale or foreign cache" in err and "data_file" in err and "--data-dir" in err
    # other lengths
    argv = _argv(pair, tmp_path / "b", "--teacher-cache", cache)
    argv[argv.index("--max-length") + 1] = "40"
    assert run_distillation(argv) == 2
    assert "max_length: cache 48, this run 40" in capsys.readouterr().err
    # another teacher given beside the cache
    assert run_distillation(_argv(pair, tmp_path / "c", "--teacher-cache", cache, "--teacher-model-path",
                                  pair["teacher_same_vocab"])) == 2
    err = capsys.readouterr().err
    assert "teacher_weights" in err and "teacher_tokenizer" in err
    assert not (tmp_path / "c").exists()  # refused before anything is written
    # the right teacher beside the cache is accepted
    assert run_distillation(_argv(pair, tmp_path / "d", "--teacher-cache", cache, "--teacher-model-path",
                                  pair["teacher"])) == 0


def test_missing_truncated_and_altered_shards_are_named(cache, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache, c)
    shard = c / shard_name(1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherCacheError, match=r"shard .*shard-00001.safetensors is truncated"):
        TeacherCacheReader(c)
    shard.unlink()
    with pytest.raises(TeacherCacheError, match=r"shard .*shard-00001.safetensors is missing"):
        TeacherCacheReader(c)
    # same size, one byte changed in the data: verify (sha256) names it
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    TeacherCacheReader(c)  # sizes and headers are fine
    with pytest.raises(TeacherCacheError, match=r"shard-00001.safetensors does not match its sha256"):
        verify_cache(c)
    # a corrupt header with the recorded size: reading names the shard
    bad = bytearray(data)
    bad[8:16] = b"\x00" * 8
    shard.write_bytes(bytes(bad))
    with pytest.raises(TeacherCacheError, match=r"cannot read shard .*shard-00001"):
        TeacherCacheReader(c)


def test_a_criterion_needing_what_the_cache_lacks_fails_at_start_up(pair, tmp_path, capsys):
    lean = tmp_path / "lean"
    tcs.build(pair["teacher"], pair["data"], lean, store=("logits",), top_k=16)
    save = tmp_path / "run"
    assert run_distillation(_argv(pair, save, "--teacher-cache", lean)) == 2
    err = capsys.readouterr().err
    assert "criterion dual_space_kd_with_cma reads the teacher's hidden, embed_tokens, lm_head" in err
    assert "--store logits,hidden,embed_tokens,lm_head" in err and not save.exists()
    # a criterion that reads only logits trains from it
    assert run_distillation(_argv(pair, tmp_path / "uld", "--teacher-cache", lean,
                                  criterion="universal_logit_distillation")) == 0
    # training examples the cache does not hold
    part = tmp_path / "part"
    tcs.build(pair["teacher"], pair["data"], part, limit=6)
    assert run_distillation(_argv(pair, tmp_path / "p", "--teacher-cache", part)) == 2
    assert "training examples are not in the cache" in capsys.readouterr().err


def test_a_bf16_top_k_cache_trains_an_fp32_run(pair, tmp_path, capsys):
    """The default kind of cache (bf16, top-k < V) feeds an fp32 run through every cached input
    (MCW-KD reads logits, hidden states, the embedding table and the head); values stay close to
    the live teacher's."""
    c = tmp_path / "bf16"
    tcs.build(pair["teacher"], pair["data"], c, top_k=16, dtype="bf16", teacher_dtype="fp32")
    reader = TeacherCacheReader(c)
    assert reader.top_k == 16 < reader.vocab and reader.dtype == torch.bfloat16
    # the logit OT compares the teacher's top --mcw-top-k logits one by one: more than stored is refused
    assert run_distillation(_argv(pair, tmp_path / "r", "--teacher-cache", c, "--mcw-top-k", "50",
                                  criterion="mcw_kd")) == 2
    assert "reads the teacher's top 50 logits rank by rank, this cache stores 16" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    rows = {}
    for name, extra in (("cached", ("--teacher-cache", c)), ("live", ("--teacher-model-path", pair["teacher"]))):
        argv = _argv(pair, tmp_path / name, *extra, "--log-interval", "1", "--mcw-top-k", "16", criterion="mcw_kd")
        assert run_distillation(argv) == 0
        rows[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    for k in ("loss", "kd_loss", "ot_logits", "ot_hidden"):
        assert math.isfinite(rows["cached"][k])
        assert rows["cached"][k] == pytest.approx(rows["live"][k], rel=0.05), k


# --------------------------------------------------------------------------- resume after kill -9
def _build_cmd(pair, out):
    return [sys.executable, "-m", "mckd.teacher_cache", "build", "--teacher-model-path", str(pair["teacher"]),
            "--data-dir", str(pair["data"]), "--output", str(out), "--max-length", "48",
            "--max-prompt-length", "32", "--top-k", "1000000", "--dtype", "fp32", "--batch-size", "1",
            "--shard-size", "1"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT / "code"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def test_a_build_killed_mid_way_resumes_where_it_stopped(pair, cache, tmp_path):
    out = tmp_path / "c"
    proc = subprocess.Popen(_build_cmd(pair, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "shards").glob("shard-*.safetensors"))) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard-*.safetensors")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert 3 <= len(done) < manifest["n_shards"] == 16 and not manifest["complete"]
    with pytest.raises(TeacherCacheError, match="the build is incomplete"):
        TeacherCacheReader(out)
    res = subprocess.run(_build_cmd(pair, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"({len(done)} already on disk)" in res.stderr
    for name, mtime in done.items():  # the shards of the killed run were kept, not rewritten
        assert (out / "shards" / name).stat().st_mtime_ns == mtime
    assert not list((out / "shards").glob(".*.tmp"))
    resumed, ref = TeacherCacheReader(out), TeacherCacheReader(cache)
    assert sorted(resumed.index) == sorted(ref.index)
    for e in ref.index:  # batch 1 vs batch 3 forwards: equal up to summation order
        a, b = resumed.example(e), ref.example(e)
        assert torch.equal(a["input_ids"], b["input_ids"])
        for k in ("hidden", "logsumexp"):
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), (e, k)
        ones = torch.ones(1, len(a["input_ids"]), dtype=torch.bool)
        za, zb = (dense_logits(x["topk_values"][None], x["topk_ids"][None], x["logsumexp"][None],
                               x["tail_logmass"][None], ones, ref.vocab) for x in (a, b))
        assert torch.allclose(za, zb, rtol=1e-5, atol=1e-5), e
    assert verify_cache(out) == 16


# --------------------------------------------------------------------------- scripts
def test_scripts_build_the_cache_and_train_from_it(tmp_path):
    import shlex

    from test_scripts import parse, run_script, split_command

    out = run_script(ROOT / "scripts/gpt2/teacher_cache_qwen.sh", GPUS="0,1", TEACHER_MODEL_PATH="/m/qwen-sft",
                     TOP_K=64).stdout.strip()
    argv = shlex.split(out)
    i = argv.index("mckd.teacher_cache")
    assert argv[:3] == ["torchrun", "--nproc_per_node", "2"] and argv[i - 1] == "-m"
    from mckd.teacher_cache.__main__ import _parser

    args = _parser().parse_args(argv[i + 1:])
    assert (args.teacher_model_path, args.top_k, args.dtype, args.teacher_dtype) == ("/m/qwen-sft", 64, "bf16", "bf16")
    assert (args.max_length, args.max_prompt_length) == (512, 256) and args.data_dir == str(ROOT / "data" / "dolly")
    assert args.output == str(ROOT / "outputs/teacher_cache/qwen/Qwen1.5-1.8B/dolly-L512-k64-bf16")
    # the LoRA teacher: base model + adapter; CPU: plain python
    out = run_script(ROOT / "scripts/tinyllama/teacher_cache_mistral.sh", GPUS="",
                     TEACHER_PEFT_PATH="/a/mistral-lora", TEACHER_CACHE=str(tmp_path / "c")).stdout
    argv = shlex.split(out.strip().splitlines()[-1])
    assert argv[:3] == [sys.executable, "-m", "mckd.teacher_cache"]
    args = _parser().parse_args(argv[3:])
    assert args.teacher_peft_path == "/a/mistral-lora" and args.output == str(tmp_path / "c")
    assert args.teacher_model_path == str(ROOT / "model_hub/mistral/mistral-7b-v0.1")
    # a KD script with TEACHER_CACHE: --teacher-cache, no teacher, no SFT checkpoint needed
    for script in ("gpt2/multicost_gpt2_base.sh", "tinyllama/dskd_cma_tinyllama.sh"):
        launch, args = split_command(run_script(ROOT / "scripts" / script, GPUS="0", TEACHER_CACHE="/c").stdout)
        cfg = parse(args)
        assert cfg.model.teacher_cache == "/c" and cfg.model.teacher_model_path is None
        assert cfg.peft.teacher_peft_path is None and cfg.criterion_options[KDOptions].kd_rate > 0

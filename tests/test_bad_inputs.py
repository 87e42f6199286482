"""Bad input, every tool: exit status 2, a one- or two-line message naming the flag, file or line,
no traceback (unless --debug / MCKD_DEBUG=1), and nothing written or changed.

The tools are called in process through their ``main(argv)``; most cases fail in validation,
before any model is loaded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_train_support as sup

ROOT = Path(__file__).resolve().parents[1]


def snapshot(*roots: Path) -> dict:
    """Every file and directory under ``roots`` with size and modification time."""
    out = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = None
            continue
        for p in [root, *root.rglob("*")]:
            st = p.stat()
            out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def error_lines(err: str, prog: str) -> list[str]:
    """The lines of the error report (log lines before it are not part of it)."""
    lines = err.strip().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{prog}: error:"))
    return lines[start:]


def check(capsys, rc: int, prog: str, *expected: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    report = error_lines(err, prog)
    assert 1 <= len(report) <= 2, report
    text = "\n".join(report)
    for e in expected:
        assert e in text, (e, text)
    return text


# --------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_models):
    base = tmp_path_factory.mktemp("bad_inputs")
    data = sup.write_data(base / "data", n_train=8, n_dev=2)
    return {"model": Path(tiny_models("gpt2")), "teacher": Path(tiny_models("gpt2", seed=1)),
            "data": data, "base": base}


def _train(env, tmp_path, *extra, criterion="cross_entropy", out=None):
    from conftest import run_distillation

    out = out or tmp_path / "out"
    argv = sup.train_argv(env["model"], env["data"], out, "--total-iters", "1", *extra, criterion=criterion)
    return run_distillation(argv), out


KD = ("--teacher-model-path",)
TRAIN_CASES = {
    "negative kd rate": (["--kd-rate", "-0.5", *KD, "T"], "various_divergence", ["--kd-rate", ">= 0"]),
    "infinite kd rate": (["--kd-rate", "inf", *KD, "T"], "various_divergence", ["--kd-rate", "finite"]),
    "kd rate above 1 when interpolating": (["--kd-rate", "1.5", *KD, "T"], "various_divergence",
                                           ["--kd-rate", "<= 1"]),
    "infinite lr": (["--lr", "inf"], None, ["--lr", "finite"]),
    "nan lr": (["--lr", "nan"], None, ["--lr", "finite"]),
    "zero lr": (["--lr", "0"], None, ["--lr", "positive"]),
    "zero temperature": (["--kd-temperature", "0", *KD, "T"], "various_divergence", ["--kd-temperature"]),
    "negative projector lr": (["--projector-lr", "-1"], None, ["--projector-lr"]),
    "label smoothing 1": (["--label-smoothing", "1.0"], None, ["--label-smoothing"]),
    "zero batch": (["--batch-size", "0"], None, ["--batch-size"]),
    "prompt longer than sequence": (["--max-prompt-length", "64"], None, ["--max-prompt-length"]),
    "divergence threshold below 1": (["--divergence-threshold", "0.5"], None, ["--divergence-threshold"]),
    "top-p above 1": (["--top-p", "1.5"], None, ["--top-p"]),
    "dev-num 0": (["--dev-num", "0"], None, ["--dev-num"]),
    "unknown flag": (["--lrr", "1"], None, ["--lrr", "did you mean"]),
    "unknown criterion": ([], "no_such_kd", ["--criterion", "no_such_kd"]),
    "kd without teacher": ([], "various_divergence", ["--teacher-model-path"]),
    "resume with overwrite": (["--resume", "--overwrite"], None, ["--resume", "--overwrite"]),
    "deepspeed without config": (["--deepspeed"], None, ["--deepspeed"]),
    "missing projector config": (["--projector-config-path", "/nonexistent/p.json"], None,
                                 ["--projector-config-path", "/nonexistent/p.json"]),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_training_flag_errors(case, env, tmp_path, capsys):
    extra, criterion, expected = TRAIN_CASES[case]
    extra = [str(env["teacher"]) if a == "T" else a for a in extra]
    before = snapshot(env["base"], env["model"], tmp_path)
    rc, out = _train(env, tmp_path, *extra, criterion=criterion or "cross_entropy")
    check(capsys, rc, "distillation.py", *expected)
    assert snapshot(env["base"], env["model"], tmp_path) == before
    assert not out.exists()


def test_training_path_errors(env, tmp_path, capsys):
    """Missing or incomplete directories, each named in the message; nothing written."""
    from conftest import run_distillation

    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((env["model"] / "config.json").read_text())
    no_dev = tmp_path / "no_dev"
    no_dev.mkdir()
    (no_dev / "train.jsonl").write_text((env["data"] / "train.jsonl").read_text())
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (dict(model=tmp_path / "nope"), ["--model-path", "does not exist"]),
        (dict(model=no_tok), ["--model-path", "no tokenizer files"]),
        (dict(data=no_dev), ["--data-dir", "dev.jsonl"]),
        (dict(out=blocker / "run"), ["--save-dir", str(blocker)]),
    ]
    for change, expected in cases:
        before = snapshot(tmp_path)
        argv = sup.train_argv(change.get("model", env["model"]), change.get("data", env["data"]),
                              change.get("out", tmp_path / "out"), "--total-iters", "1")
        check(capsys, run_distillation(argv), "distillation.py", *expected)
        assert snapshot(tmp_path) == before


def test_non_empty_run_dir_is_left_alone(env, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "args.json").write_text("{}\n")
    before = snapshot(tmp_path)
    rc, _ = _train(env, tmp_path, out=out)
    check(capsys, rc, "distillation.py", "--save-dir", "not empty", "--resume", "--overwrite")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["invalid json", "not utf-8", "missing output"])
def test_bad_training_data_names_file_and_line(what, env, tmp_path, capsys):
    data = sup.write_data(tmp_path / "data", n_train=8, n_dev=2)
    lines = (data / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = {"invalid json": b'{"instruction": "x", "output": \n',
                "not utf-8": b'{"instruction": "caf\xe9", "input": "", "output": "x"}\n',
                "missing output": b'{"instruction": "x", "input": ""}\n'}[what]
    (data / "train.jsonl").write_bytes(b"".join(lines))
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    from conftest import run_distillation

    rc = run_distillation(sup.train_argv(env["model"], data, out, "--total-iters", "1"))
    check(capsys, rc, "distillation.py", f"{data / 'train.jsonl'}:3")
    assert snapshot(tmp_path) == before and not out.exists()


def test_same_vocabulary_criterion_checks_token_ids_not_just_size(env, tmp_path, capsys):
    """A teacher whose tokenizer has the student's vocabulary size but two ids swapped."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(env["teacher"], teacher)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # in every byte-level alphabet
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    for f in ("vocab.json", "merges.txt"):
        (teacher / f).unlink(missing_ok=True)
    rc, out = _train(env, tmp_path, "--teacher-model-path", str(teacher), criterion="various_divergence")
    check(capsys, rc, "distillation.py", "--teacher-model-path", "share one vocabulary", "ids map to")
    assert not out.exists()


def test_debug_flag_and_env_show_the_traceback(env, tmp_path, capsys, monkeypatch):
    from conftest import run_distillation

    argv = sup.train_argv(env["model"], env["data"], tmp_path / "o", "--lr", "inf")
    assert run_distillation([*argv, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("MCKD_DEBUG", "1")
    assert run_distillation(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "distillation.py: error: argument --lr" in err


def test_entry_point_process_exit_status(env, tmp_path):
    """The real process: status 2, one line on stderr."""
    res = subprocess.run([sys.executable, str(ROOT / "code/distillation.py"),
                          *sup.train_argv(env["model"], env["data"], tmp_path / "o", "--kd-rate", "-1",
                                          "--teacher-model-path", str(env["teacher"]),
                                          criterion="various_divergence")],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("distillation.py: error: --kd-rate")
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- evaluation
@pytest.fixture()
def eval_env(tmp_path, env):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(env["model"], ckpt)
    data = tmp_path / "evaldata" / "dolly"
    data.mkdir(parents=True)
    (data / "valid.jsonl").write_text((env["data"] / "dev.jsonl").read_text())
    return ckpt, data.parent


EVAL_CASES = {
    "top-p 0": (["--top-p", "0"], ["--top-p"]),
    "negative temperature": (["--temperature", "-1"], ["--temperature"]),
    "infinite temperature": (["--temperature", "inf"], ["--temperature", "finite"]),
    "zero batch": (["--eval-batch-size", "0"], ["--eval-batch-size"]),
    "max length below prompt": (["--max-length", "100"], ["--max-length"]),
    "unknown dtype": (["--dtype", "fp8"], ["--dtype"]),
    "negative top-k": (["--top-k", "-3"], ["--top-k"]),
    "missing data dir": (["--data-dir", "/nonexistent/data"], ["--data-dir", "/nonexistent/data"]),
    "unknown dataset": (["--datasets", "nosuchset"], ["nosuchset"]),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_evaluation_flag_errors(case, eval_env, capsys):
    import evaluate

    ckpt, data = eval_env
    extra, expected = EVAL_CASES[case]
    argv = ["run", "--ckpt", str(ckpt), "--data-dir", str(data), "--datasets", "dolly", "--seeds", "10",
            "--device", "cpu", *extra]
    if "--datasets" in extra:
        argv = argv[:argv.index("--datasets")] + argv[argv.index("--datasets") + 2:]
    before = snapshot(ckpt, data)
    check(capsys, evaluate.main(argv), "evaluate.py", *expected)
    assert snapshot(ckpt, data) == before


def test_evaluation_checkpoint_errors(eval_env, tmp_path, capsys):
    import evaluate

    ckpt, data = eval_env
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/remote"}))
    for path, expected in ((ckpt, ["no tokenizer files"]), (tmp_path / "missing", ["--ckpt"]),
                           (adapter, ["LoRA adapter", "org/remote"])):
        before = snapshot(tmp_path)
        rc = evaluate.main(["run", "--ckpt", str(path), "--data-dir", str(data), "--datasets", "dolly",
                            "--device", "cpu"])
        check(capsys, rc, "evaluate.py", *expected)
        assert snapshot(tmp_path) == before
    check(capsys, evaluate.main(["run"]), "evaluate.py", "--ckpt")  # usage error, one line


# --------------------------------------------------------------------------- vocabulary map
def test_vocab_map_cli_errors(env, tmp_path, capsys):
    from mckd.data.vocab_map import main

    empty = tmp_path / "empty"
    empty.mkdir()
    a_dir = tmp_path / "adir"
    a_dir.mkdir()
    t, s = str(env["teacher"]), str(env["model"])
    cases = [
        (["--teacher", str(tmp_path / "nope"), "--student", s, "--out", str(tmp_path / "m.json")],
         [str(tmp_path / "nope")]),
        (["--teacher", str(empty), "--student", s, "--out", str(tmp_path / "m.json")],
         [str(empty), "no tokenizer files"]),
        (["--teacher", t, "--student", s, "--out", str(tmp_path / "m.json"), "--workers", "0"],
         ["--workers"]),
        (["--teacher", t, "--student", s, "--out", str(a_dir)], ["--out", "is a directory"]),
        (["--teacher", t, "--student", s], ["--out"]),
    ]
    for argv, expected in cases:
        before = snapshot(tmp_path)
        check(capsys, main(argv), "mckd-vocab-map", *expected)
        assert snapshot(tmp_path) == before


def test_vocab_map_file_errors_name_the_file(tmp_path):
    from mckd.data.examples import DataFormatError
    from mckd.data.vocab_map import load_vocab_map

    bad = tmp_path / "map.json"
    bad.write_text('{"0": 1,\n "1": }')
    with pytest.raises(DataFormatError, match=f"{bad}:2: invalid JSON"):
        load_vocab_map(bad)


# --------------------------------------------------------------------------- data preparation
def _raw(tmp_path: Path, *lines: bytes) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = tmp_path / "raw.jsonl"
    good = json.dumps({"instruction": "Say hi.", "context": "", "response": "hi", "category": "x"}).encode()
    raw.write_bytes(b"\n".join([good, good, *lines, good]) + b"\n")
    return raw


def test_prepare_cli_errors(tmp_path, capsys):
    from mckd.data.prepare import main

    out = tmp_path / "out"
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "train.jsonl").write_text("old\n")
    utf = _raw(tmp_path / "u", b'{"instruction": "caf\xe9", "context": "", "response": "r", "category": "x"}')
    cases = [
        (["dolly", "--raw", str(utf), "--out", str(out)], [f"{utf}:3", "UTF-8"]),
        (["dolly", "--raw", str(_raw(tmp_path / "j", b'{"instruction": ')), "--out", str(out)],
         [":3: invalid JSON"]),
        (["dolly", "--raw", str(_raw(tmp_path / "f", b'{"instruction": "x"}')), "--out", str(out)],
         [":3: missing field"]),
        (["dolly", "--raw", str(tmp_path / "missing.jsonl"), "--out", str(out)], ["missing.jsonl"]),
        (["dolly", "--raw", str(utf), "--out", str(out), "--dev-size", "-1"], ["--dev-size"]),
        (["dolly", "--raw", str(utf), "--out", str(out), "--max-prompt-tokens", "5"], ["--tokenizer"]),
        (["dolly", "--raw", str(_raw(tmp_path / "ok")), "--out", str(existing), "--dev-size", "1",
          "--valid-size", "1"], ["--overwrite"]),
        (["dolly", "--raw", str(_raw(tmp_path / "ok2")), "--out", str(out), "--dev-size", "5"],
         ["--dev-size 5", "leave training records"]),
        (["dolly"], ["--raw"]),
    ]
    for argv, expected in cases:
        before = snapshot(tmp_path)
        check(capsys, main(argv), "python -m mckd.data.prepare", *expected)
        assert snapshot(tmp_path) == before and not out.exists()


# --------------------------------------------------------------------------- scripts
@pytest.mark.slow
def test_script_reports_bad_input_and_can_rerun(tmp_path):
    """scripts/tiny/train.sh: python's one-line error and status 2; the launcher files it leaves
    (console.log, command.sh) do not block the corrected rerun."""
    env = {k: v for k, v in os.environ.items() if k not in ("RESUME", "OVERWRITE", "LR")}
    env.update(PYTHON=sys.executable, CKPT_PATH=str(tmp_path / "no_model"), SAVE_PATH=str(tmp_path / "run"),
               GPUS="")
    for _ in range(2):
        res = subprocess.run(["bash", str(ROOT / "scripts/tiny/train.sh")], env=env, capture_output=True,
                             text=True, timeout=300)
        console = res.stdout + res.stderr  # the script tees python's output to console.log
        assert res.returncode == 2, console[-2000:]
        assert "distillation.py: error: --model-path" in console and "Traceback" not in console
        assert "not empty" not in console
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["command.sh", "console.log"]

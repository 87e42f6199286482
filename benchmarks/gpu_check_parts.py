"""Parts of the GPU check (``scripts/gpu_check.sh``) that need their own Python code.

Subcommands (each run by :mod:`gpu_check` as a subprocess with its own time limit)::

    python benchmarks/gpu_check_parts.py setup    --work W [--small] [--tokenizers auto|tiny|DIR]
    python benchmarks/gpu_check_parts.py criteria --work W --json FILE [--device cuda]

``setup`` builds what the other parts read, under ``W``:

* ``W/tiny/``: the embedded default's generated data and its two trained tokenizers
  (``python -m mckd.tiny.build``): the training and evaluation data of the check, and the
  tokenizers used when the real ones are not found;
* ``W/models/{student,teacher,teacher_same}/``: random-init models saved in Hugging Face format
  with their tokenizers: a GPT2-base-shaped student (12 layers, hidden 768, V = 50257), a
  Qwen1.5-1.8B-shaped cross-vocabulary teacher (24 layers, hidden 2048, V = 151936) and a
  GPT2-base-shaped same-vocabulary teacher (another seed). ``--small``: 2 layers, hidden 64, and
  the vocabulary of the tokenizer in use;
* ``W/hub/gpt2/gpt2-base``: a link to the student, the layout ``bench_generation.py --hub`` reads;
* ``W/setup.json``: where the tokenizers came from and the model shapes.

Tokenizers (``--tokenizers auto``): the first folder among ``$GPU_CHECK_HUB``, ``model_hub/`` of
the repository, ``$MCKD_SHARED/model_hub`` and ``../shared/model_hub`` that holds both
``gpt2/gpt2-base`` and ``qwen/Qwen1.5-1.8B`` (tokenizer files and config.json); when none does, the
embedded default's tokenizers, with the models keeping the real vocabulary sizes (logits, heads
and criteria are full size; only the ids in use are fewer). ``--small`` uses the embedded
default's tokenizers unless ``--tokenizers`` names another source.

``criteria`` runs every registered criterion forward + backward on one batch of B examples of up
to L tokens built by the training data pipeline (real tokenizations, the alignment features the
criteria read), with the student forward and backward inside the step and the teacher forward
before it, three ways on the same inputs and weights:

* ``fp32``: fp32 models and criterion (the reference);
* ``autocast``: fp32 weights under bf16 autocast (the plain torch engine's ``--precision bf16``);
* ``bf16``: models and criterion cast to bf16 (DeepSpeed's bf16 mode).

A low-precision run passes when its loss and every gradient are finite, its per-token loss is
within ``LOSS_RTOL * |ref| + LOSS_ATOL`` of the fp32 one, and the cosine between its student
gradient and the fp32 one is at least ``GRAD_COS_MIN``. On CUDA the number of host
synchronisations of one bf16 step is counted (``torch.cuda.set_sync_debug_mode``) and reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

import torch  # noqa: E402

HUB_DIRS = {"student": "gpt2/gpt2-base", "teacher": "qwen/Qwen1.5-1.8B"}
GPT2_BASE = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
QWEN_1_8B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                 max_position_embeddings=32768)
LOSS_RTOL, LOSS_ATOL = 0.02, 0.01   # per-token loss, low precision vs fp32
GRAD_COS_MIN = 0.97                 # cosine of the flattened student gradients, low precision vs fp32


# --------------------------------------------------------------------------- setup
def find_real_hub(explicit: str | None = None) -> Path | None:
    """The first folder holding both real tokenizers (see the module docstring), or None."""
    shared = os.environ.get("MCKD_SHARED")
    cands = [explicit or os.environ.get("GPU_CHECK_HUB"), ROOT / "model_hub",
             shared and Path(shared) / "model_hub", ROOT.parent / "shared" / "model_hub"]
    for c in cands:
        if c and all((Path(c) / d / "config.json").is_file() for d in HUB_DIRS.values()):
            return Path(c)
    return None


def _configs(real: Path | None, small: bool, vocab: dict):
    """(student, teacher) HF configs: the real config.json when found, else the shapes above."""
    from transformers import AutoConfig, GPT2Config, Qwen2Config

    if real is not None:
        s_cfg = AutoConfig.from_pretrained(real / HUB_DIRS["student"], local_files_only=True)
        t_cfg = AutoConfig.from_pretrained(real / HUB_DIRS["teacher"], local_files_only=True)
    else:
        s_cfg, t_cfg = GPT2Config(**GPT2_BASE), Qwen2Config(**QWEN_1_8B)
    if small:
        s_cfg.n_layer, s_cfg.n_embd, s_cfg.n_head = 2, 64, 4
        t_cfg.num_hidden_layers, t_cfg.hidden_size, t_cfg.intermediate_size = 2, 64, 128
        t_cfg.num_attention_heads = t_cfg.num_key_value_heads = 4
        if getattr(t_cfg, "head_dim", None):
            t_cfg.head_dim = 16
        if getattr(t_cfg, "layer_types", None):
            t_cfg.layer_types = t_cfg.layer_types[:2]
        s_cfg.vocab_size, t_cfg.vocab_size = vocab["student"], vocab["teacher"]
    return s_cfg, t_cfg


def _save_model(cfg, tokenizer, out: Path, seed: int, device: str, dtype: torch.dtype) -> int:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def setup(args) -> dict:
    from mckd.models.tokenizers import load_tokenizer

    work = Path(args.work)
    t0 = time.perf_counter()
    from mckd.tiny import build as tiny_build

    tiny_build.main(["--out", str(work / "tiny"), "--train-size", "200", "--dev-size", "20", "--test-size", "64"])
    tiny_tok = work / "tiny" / "model_hub" / "tiny" / "tokenizers"
    real = None
    if args.tokenizers == "auto" and not args.small:
        real = find_real_hub()
    elif args.tokenizers not in ("auto", "tiny"):
        real = find_real_hub(args.tokenizers)
        if real is None:
            raise SystemExit(f"--tokenizers {args.tokenizers}: no {' and '.join(HUB_DIRS.values())} "
                             "(config.json + tokenizer files) under it")
    if real is not None:
        toks = {k: load_tokenizer(str(real / d)) for k, d in HUB_DIRS.items()}
        source = f"real tokenizers from {real}"
    else:
        toks = {k: load_tokenizer(str(tiny_tok / k)) for k in HUB_DIRS}
        source = f"embedded default's tokenizers ({tiny_tok})"
    vocab = {k: len(t) for k, t in toks.items()}
    s_cfg, t_cfg = _configs(real, args.small, vocab)
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = torch.float32 if args.small else torch.bfloat16
    models = work / "models"
    params = {
        "student": _save_model(s_cfg, toks["student"], models / "student", 0, device, dtype),
        "teacher": _save_model(t_cfg, toks["teacher"], models / "teacher", 1, device, dtype),
        "teacher_same": _save_model(s_cfg, toks["student"], models / "teacher_same", 2, device, dtype),
    }
    link = work / "hub" / HUB_DIRS["student"]
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(models / "student", target_is_directory=True)
    info = {"tokenizers": source, "tokenizer_sizes": vocab,
            "student": {"layers": s_cfg.n_layer, "hidden": s_cfg.n_embd, "vocab": s_cfg.vocab_size},
            "teacher": {"layers": t_cfg.num_hidden_layers, "hidden": t_cfg.hidden_size, "vocab": t_cfg.vocab_size},
            "params": params, "saved_dtype": str(dtype).replace("torch.", ""), "seconds": time.perf_counter() - t0}
    (work / "setup.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return info


# --------------------------------------------------------------------------- criteria
def long_examples(src: Path, out: Path, n: int) -> Path:
    """``n`` long training records built by joining the generated ones (prompts of a few hundred
    tokens, responses longer than the rest of the sequence), written as ``out/train.jsonl``."""
    recs = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for i in range(n):
            chunk = recs[(i * 40) % len(recs):][:40] or recs[:40]
            instr = " ".join(f"{r['instruction']} {r.get('input', '')}".strip() for r in chunk[:12])
            output = " ".join(str(r["output"]) if isinstance(r["output"], str) else str(r["output"][0])
                              for r in chunk[12:]) * 4
            f.write(json.dumps({"instruction": instr, "input": "", "output": output}) + "\n")
    return out / "train.jsonl"


def _batch(path: Path, s_tok, t_tok, length: int, batch: int, device: str, cache: Path):
    from mckd.data import DistillCollator, build_dataset
    from mckd.data.alignment import KNOWN_ALIGNMENTS

    align = KNOWN_ALIGNMENTS if t_tok is not s_tok else ()
    ds = build_dataset(path, student_tokenizer=s_tok, teacher_tokenizer=t_tok, max_length=length,
                       max_prompt_length=length // 2, alignment=align, cache_dir=cache)
    b = DistillCollator(s_tok.pad_token_id, t_tok.pad_token_id, alignment=align)([ds[i] for i in range(batch)])
    return {k: v.to(device) for k, v in b.items()}


def _flat_grad(module) -> torch.Tensor:
    gs = [p.grad.detach().float().flatten() for p in module.parameters() if p.grad is not None]
    return torch.cat(gs) if gs else torch.zeros(1)


def _step(module, teacher, batch, *, autocast_dtype, device: str, count_syncs: bool = False):
    """One forward + backward of ``DistillModule`` (student forward inside) with the teacher view
    computed first, as the training loop does. Returns (per-token loss, n tokens, metrics,
    student gradient, criterion gradients finite, host syncs or None)."""
    import contextlib

    from mckd.models.loading import model_view
    from mckd.train.engine import model_inputs

    module.zero_grad(set_to_none=True)
    ac = (torch.autocast(device_type=device, dtype=autocast_dtype) if autocast_dtype is not None
          else contextlib.nullcontext())
    need_h = module.criterion.needs_hidden
    syncs = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if count_syncs:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            t_view = None
            if teacher is not None:
                with torch.no_grad(), ac:
                    out = teacher(**model_inputs(teacher, batch, "teacher_"), output_hidden_states=need_h,
                                  use_cache=False)
                t_view = model_view(teacher, out, with_hidden=need_h)
            with ac:
                loss_sum, n_tok, metrics = module(batch, t_view)
            (loss_sum / n_tok.clamp_min(1)).backward()
        finally:
            if count_syncs:
                torch.cuda.set_sync_debug_mode("default")
    if count_syncs:
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    crit_ok = all(torch.isfinite(p.grad).all().item() for p in module.criterion.parameters() if p.grad is not None)
    return (float(loss_sum.detach().float() / n_tok.clamp_min(1).float()), int(n_tok), metrics,
            _flat_grad(module.student), crit_ok, syncs)


def criteria(args) -> dict:
    from mckd.config import parse_config
    from mckd.criteria import CriterionResources, get_criterion_class, known_criteria
    from mckd.models import loading
    from mckd.train.engine import DistillModule

    work = Path(args.work)
    device = args.device
    models = work / "models"
    torch.manual_seed(0)
    student, s_tok, _ = loading.load_student(str(models / "student"), dtype="fp32")
    teachers = {}
    for name in ("teacher", "teacher_same"):
        t, t_tok, _ = loading.load_teacher(str(models / name), dtype="fp32")
        teachers[name] = (t.to(device).eval(), t_tok)
    student = student.to(device)
    data = long_examples(work / "tiny" / "data" / "tiny" / "train.jsonl", work / "data_long", args.batch)
    batches = {name: _batch(data, s_tok, tok, args.length, args.batch, device, work / "cache")
               for name, (_, tok) in teachers.items()}
    low = {name: copy.deepcopy(t).to(torch.bfloat16) for name, (t, _) in teachers.items()}
    names = [n for n in known_criteria() if not args.only or n in args.only]
    rows = []
    for name in names:
        cls = get_criterion_class(name)
        tname = "teacher" if cls.cross_tokenizer else "teacher_same"
        teacher, t_tok = teachers[tname] if cls.needs_teacher else (None, None)
        batch = batches[tname]
        argv = ["--criterion", name, "--model-path", str(models / "student"), "--data-dir", str(work),
                "--save-dir", str(work / "criteria_run"), "--lr", "5e-4",
                "--projector-config-path", str(ROOT / "configs" / "projector_config.json"), "--kd-rate", "0.5"]
        if cls.needs_teacher:
            argv += ["--teacher-model-path", str(models / tname)]
        row = {"criterion": name, "teacher": tname if cls.needs_teacher else None, "B": args.batch,
               "T_s": int(batch["input_ids"].shape[1]),
               "T_t": int(batch["teacher_input_ids"].shape[1]) if "teacher_input_ids" in batch else None,
               "label_tokens": int((batch["labels"] != -100).sum()), "device": device}
        t0 = time.perf_counter()
        try:
            options = parse_config(argv, check_paths=False).criterion_options
            dims = loading.read_dims(str(models / "student"), str(models / tname) if cls.needs_teacher else None)
            crit = cls.from_options(options, dims, CriterionResources(student_tokenizer=s_tok, teacher_tokenizer=t_tok,
                                                                      student_model=student, teacher_model=teacher))
            ref_mod = DistillModule(student, crit.to(device)).train()
            ref_mod.student.eval()  # no dropout: the runs below must compute the same function
            ref = _step(ref_mod, teacher, batch, autocast_dtype=None, device=device)
            row["fp32"] = {"loss": ref[0], "finite": math.isfinite(ref[0]) and bool(torch.isfinite(ref[3]).all())
                           and ref[4]}
            runs = {"autocast": (ref_mod, teacher, torch.bfloat16)}
            bf_mod = copy.deepcopy(ref_mod).to(torch.bfloat16)
            runs["bf16"] = (bf_mod, low[tname] if teacher is not None else None, None)
            ok = row["fp32"]["finite"]
            for mode, (mod, tea, ac) in runs.items():
                res = _step(mod, tea, batch, autocast_dtype=ac, device=device,
                            count_syncs=device == "cuda" and mode == "bf16")
                cos = float(torch.nn.functional.cosine_similarity(res[3], ref[3], dim=0))
                finite = math.isfinite(res[0]) and bool(torch.isfinite(res[3]).all()) and res[4]
                dev = abs(res[0] - ref[0])
                tol = LOSS_RTOL * abs(ref[0]) + LOSS_ATOL
                passed = finite and dev <= tol and cos >= GRAD_COS_MIN
                row[mode] = {"loss": res[0], "abs_dev": dev, "tol": tol, "grad_cos": cos, "finite": finite,
                             "host_syncs": res[5], "pass": passed}
                ok = ok and passed
            row["metrics_bf16"] = {k: float(v.detach().float().mean()) for k, v in res[2].items()}
            row["status"] = "pass" if ok else "fail"
            del bf_mod, ref_mod, crit
        except Exception as e:  # noqa: BLE001 - one criterion's failure is reported, the rest still run
            row["status"] = "fail"
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    out = {"rows": rows, "tolerance": {"loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL, "grad_cos_min": GRAD_COS_MIN}}
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--work", required=True)
    s.add_argument("--small", action="store_true")
    s.add_argument("--tokenizers", default="auto",
                   help="auto, tiny, or a folder with gpt2/gpt2-base and qwen/Qwen1.5-1.8B")
    c = sub.add_parser("criteria")
    c.add_argument("--work", required=True)
    c.add_argument("--json", required=True)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    c.add_argument("--length", type=int, default=512)
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--only", nargs="*", default=None, help="registry names (default: every criterion)")
    args = p.parse_args(argv)
    if args.cmd == "setup":
        setup(args)
        return 0
    out = criteria(args)
    return 0 if all(r["status"] == "pass" for r in out["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

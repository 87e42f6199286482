"""How far the criteria move when the teacher cache keeps only the top-k logits (real vocabularies).

For each teacher / student pair with the real tokenizers (Qwen1.5 -> GPT-2, Mistral -> TinyLLaMA)
and each criterion that reads teacher logits, the criterion runs twice on the same batches: with
the teacher's full logits, and with the logits the cache rebuilds from the top-k entries plus the
tail mass (top-k exact, the remaining mass spread uniformly over the other V - k ids;
:func:`mckd.teacher_cache.shards.dense_logits`, stored in fp32 here so only k matters). Reported:
``|value_k - value_full| / |value_full|`` of the loss and of each metric that reads teacher logits,
the worst over the measured batches.

Distributions. Random-init models with 150k-id vocabularies give nearly uniform next-token
distributions, on which any top-k cache looks bad; a teacher SFT'd on the very examples it is
cached on is far more peaked. The teacher's logits here are **synthetic power-law (Zipf) logits**
with the real vocabulary size: at each position a random permutation of the vocabulary ranks the
ids, and the id of rank r gets logit ``-alpha * ln r``, with ``alpha`` drawn per position from
U(``--alpha-min``, ``--alpha-max``) (default 1.5-2.5: entropy ~1-3 nats, top-1 probability
0.4-0.8; measured values are printed). Its hidden states, embedding table and head come from a
random-init small model (2 layers, hidden 64) with the real tokenizer; the students are random-init
small models too (a GPT-2 / TinyLLaMA-vocabulary one for the cross-vocabulary criteria, one with the
teacher's own vocabulary for vanilla KD and DSKD). Batches: held-out Dolly examples
(../shared/data/dolly/valid.jsonl) tokenised by the real tokenizers. Projectors are random (seeded):
the numbers measure the teacher-logit path only.

Run (the table of docs/teacher_cache.md)::

    python benchmarks/topk_fidelity.py --pairs qwen-gpt2 --batches 1 --max-length 96 --json benchmarks/results/topk_fidelity_qwen.json
    python benchmarks/topk_fidelity.py --pairs mistral-tinyllama --batches 1 --max-length 96 --json benchmarks/results/topk_fidelity_mistral.json
    # and each again with --kd-temperature 2 (topk_fidelity_{qwen,mistral}_t2.json)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402,F401  (puts code/ on the path)

import torch  # noqa: E402

SHARED = harness.ROOT.parent / "shared"
PAIRS = {  # name -> (teacher hub dir, student hub dir, MinED vocabulary map dir)
    "qwen-gpt2": ("qwen/Qwen1.5-1.8B", "gpt2/gpt2-base", "qwen_to_gpt2"),
    "mistral-tinyllama": ("mistral/mistral-7b-v0.1", "tinyllama/tinyllama-1.1b-3T", "mistral_to_tinyllama"),
}
# criterion -> metrics that read the teacher's logits (besides the loss)
CROSS = {"dual_space_kd_with_cma": ("s2t_kd_loss",), "universal_logit_distillation": ("uld_loss",),
         "min_edit_dis_kld": ("kd_loss",), "multi_level_ot": ("kd_loss",), "mcw_kd": ("ot_logits", "s2t_kd_loss")}
SAME = {"various_divergence": ("kd_loss",), "dual_space_kd": ("s2t_kd_loss",)}


def tiny_lm(hub: Path, seed: int, hidden: int = 64):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hub).to_dict()
    cfg.pop("layer_types", None)
    if cfg["model_type"] == "gpt2":
        cfg.update(n_layer=2, n_embd=hidden, n_head=4)
    else:
        cfg.update(num_hidden_layers=2, hidden_size=hidden, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=2 * hidden, head_dim=hidden // 4)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def zipf_logits(mask: torch.Tensor, vocab: int, alpha_min: float, alpha_max: float, seed: int) -> torch.Tensor:
    """(B, T, V) power-law logits on the positions of ``mask`` (0 elsewhere): id of rank r -> -alpha ln r."""
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    z = torch.zeros(B, T, vocab)
    n = int(mask.sum())
    alpha = alpha_min + (alpha_max - alpha_min) * torch.rand(n, 1, generator=g)
    ranked = -alpha * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))[None]     # (n, V)
    perm = torch.rand(n, vocab, generator=g).argsort(-1)
    z[mask] = torch.empty(n, vocab).scatter_(-1, perm, ranked)
    return z


def criterion(name: str, dims, resources, mined_map: Path | None, temperature: float = 1.0):
    from mckd.config import parse_config
    from mckd.criteria.base import get_criterion_class

    argv = ["--model-path", "s", "--teacher-model-path", "t", "--data-dir", "d", "--save-dir", "o", "--lr", "1",
            "--criterion", name, "--projector-config-path", str(harness.ROOT / "configs" / "projector_config.json"),
            "--kd-temperature", str(temperature)]
    if name == "min_edit_dis_kld":
        argv += ["--teacher-to-student-id-mapping", str(mined_map)]
    options = parse_config(argv, check_paths=False).criterion_options
    torch.manual_seed(0)
    return get_criterion_class(name).from_options(options, dims, resources).eval()


def views(model, batch, prefix: str):
    from mckd.models.loading import model_view

    with torch.no_grad():
        out = model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"],
                    output_hidden_states=True)
    return model_view(model, out, with_hidden=True)


def topk_view(view, mask, k: int):
    from mckd.criteria.base import ModelView
    from mckd.teacher_cache.build import topk_entries
    from mckd.teacher_cache.shards import dense_logits

    V = view.logits.shape[-1]
    e = topk_entries(view.logits[mask].float(), min(k, V))
    full = {}
    for key, v in e.items():
        full[key] = torch.zeros(*mask.shape, *v.shape[1:], dtype=v.dtype)
        full[key][mask] = v
    z = dense_logits(full["topk_values"], full["topk_ids"], full["logsumexp"], full["tail_logmass"], mask, V)
    return ModelView(logits=z, hidden=view.hidden, embed_tokens=view.embed_tokens, lm_head=view.lm_head), e


def _values(out, keys) -> dict[str, float]:
    """Per-token values: the loss and the asked metrics (token sums) over the label-token count."""
    n = max(float(out.n_tokens), 1.0)
    vals = {k: float(v) / n for k, v in out.metrics.items() if k in keys}
    vals["loss"] = float(out.loss_sum) / n
    return vals


def measure_pair(pair: str, args) -> list[dict]:
    from mckd.criteria.base import CriterionResources, ModelDims
    from mckd.data import build_batch
    from mckd.data.examples import read_examples
    from mckd.models.tokenizers import load_tokenizer

    t_hub, s_hub, map_dir = PAIRS[pair]
    t_dir, s_dir = SHARED / "model_hub" / t_hub, SHARED / "model_hub" / s_hub
    ttok, stok = load_tokenizer(str(t_dir)), load_tokenizer(str(s_dir))
    test = read_examples(SHARED / "data" / "dolly" / "valid.jsonl", limit=args.batch * args.batches)
    teacher, student, student_same = tiny_lm(t_dir, 1).eval(), tiny_lm(s_dir, 2).eval(), tiny_lm(t_dir, 3).eval()
    dims = ModelDims(student_hidden=64, student_vocab=student.config.vocab_size, teacher_hidden=64,
                     teacher_vocab=teacher.config.vocab_size)
    dims_same = ModelDims(student_hidden=64, student_vocab=teacher.config.vocab_size, teacher_hidden=64,
                          teacher_vocab=teacher.config.vocab_size)
    mined_map = SHARED / "reference" / "vocab_alignment" / map_dir / "tea2stu_id_mapping.json"
    tau = args.kd_temperature
    crits = {n: criterion(n, dims, CriterionResources(stok, ttok), mined_map, tau) for n in CROSS}
    crits.update({n: criterion(n, dims_same, CriterionResources(ttok, ttok), None, tau) for n in SAME})
    align = tuple(sorted({a for c in crits.values() for a in c.alignment}))
    rows: dict[tuple, dict] = {}
    stats = {k: [] for k in ("entropy", "top1")}
    tails = {k: [] for k in args.ks}
    for b0 in range(0, len(test), args.batch):
        ex = test[b0:b0 + args.batch]
        prompts, resp = [e.prompt for e in ex], [e.outputs[0] for e in ex]
        kw = dict(max_length=args.max_length, max_prompt_length=args.max_length // 2, drop_unlabeled=True)
        cross = build_batch(prompts, resp, student_tokenizer=stok, teacher_tokenizer=ttok, alignment=align, **kw)
        same = build_batch(prompts, resp, student_tokenizer=ttok, teacher_tokenizer=ttok, **kw)
        t_cross, t_same = views(teacher, cross, "teacher_"), views(teacher, same, "teacher_")
        for view, bt in ((t_cross, cross), (t_same, same)):  # the synthetic peaked distributions
            view.logits = zipf_logits(bt["teacher_attention_mask"].bool(), teacher.config.vocab_size,
                                      args.alpha_min, args.alpha_max, seed=b0)
        s_cross, s_same = views(student, cross, ""), views(student_same, same, "")
        m = cross["teacher_attention_mask"].bool()
        lp = t_cross.logits[m].float().log_softmax(-1)
        stats["entropy"].append(float(-(lp.exp() * lp).sum(-1).mean()))
        stats["top1"].append(float(lp.max(-1).values.exp().mean()))
        for name, c in crits.items():
            batch, s_view, t_view = (same, s_same, t_same) if name in SAME else (cross, s_cross, t_cross)
            keys = ("loss",) + (SAME.get(name) or CROSS[name])
            with torch.no_grad():
                ref = _values(c(batch, s_view, t_view), keys)
            tm = batch["teacher_attention_mask"].bool()
            for k in args.ks:
                tv, e = topk_view(t_view, tm, k)
                if name == "dual_space_kd_with_cma":
                    tails[k].append(float(e["tail_logmass"].exp().mean()))
                with torch.no_grad():
                    got = _values(c(batch, s_view, tv), keys)
                for kk in keys:
                    err = abs(got[kk] - ref[kk]) / max(abs(ref[kk]), 1e-12)
                    r = rows.setdefault((name, kk, k), {"pair": pair, "criterion": name, "metric": kk, "k": k,
                                                        "rel_error": 0.0, "value_full": ref[kk]})
                    r["rel_error"] = max(r["rel_error"], err)
    print(f"# {pair}: teacher V = {teacher.config.vocab_size}; mean entropy {sum(stats['entropy']) / len(stats['entropy']):.2f} "
          f"nats, mean top-1 probability {sum(stats['top1']) / len(stats['top1']):.3f}; mean tail mass "
          + ", ".join(f"k={k}: {sum(v) / len(v):.2e}" for k, v in tails.items()), flush=True)
    return list(rows.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256, 1024])
    p.add_argument("--alpha-min", type=float, default=1.5)
    p.add_argument("--alpha-max", type=float, default=2.5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--kd-temperature", type=float, default=1.0,
                   help="--kd-temperature of the criteria (the published scripts use 2.0-3.0); MCW-KD's "
                        "sequence temperature (2.0) and Multi-Level OT's (2.0) are their own defaults")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    harness.configure_cpu(args.threads)
    print(f"# {harness.machine()}; --kd-temperature {args.kd_temperature}", flush=True)
    results = []
    for pair in args.pairs:
        rows = measure_pair(pair, args)
        print(f"\n| {pair}: criterion | metric | value (full) | " + " | ".join(f"k={k}" for k in args.ks) + " |")
        print("|---|---|---|" + "---|" * len(args.ks))
        for (name, metric) in dict.fromkeys((r["criterion"], r["metric"]) for r in rows):
            cells = [r for r in rows if r["criterion"] == name and r["metric"] == metric]
            print(f"| {name} | {metric} | {cells[0]['value_full']:.4g} | "
                  + " | ".join(f"{r['rel_error']:.1e}" for r in cells) + " |", flush=True)
        results.extend(rows)
    return harness.finish(results, args.json)


if __name__ == "__main__":
    sys.exit(main())

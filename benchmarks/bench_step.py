"""Whole training step: student forward + backward, teacher forward, criterion, optimizer step.

MCW-KD against DSKD-CMA and plain CE with the same models and batch, interleaved (the MCW-KD
target: a whole step at most 1.3x a DSKD-CMA step).

Run (CPU by default, one torch thread; on a GPU add ``--device cuda --dtype bf16 --full-depth``)::

    python benchmarks/bench_step.py                                   # B=4, L=256 and 512, CPU shapes
    python benchmarks/bench_step.py --lengths 512 --repeats 5 --json step.json
    python benchmarks/bench_step.py --device cuda --dtype bf16 --full-depth --lengths 512 --repeats 10

Models (random weights, built from configs, nothing downloaded):

* student: GPT-2 with GPT2-base widths (vocabulary 50257, hidden 768, 12 heads) and
  ``--student-layers`` layers (2 by default on CPU; ``--full-depth``: 12);
* teacher: Qwen2 with Qwen1.5-1.8B widths (vocabulary 151936, hidden 2048, intermediate 5504,
  16 heads, untied head) and ``--teacher-layers`` layers (1 by default; ``--full-depth``: 24).

The vocabulary-sized parts (heads, logits, criteria) are full size; only the depth is cut, so on
CPU the criterion's share of the step is larger than with full-depth models. Batch layout as in
:mod:`harness` (35 % prompt, 55 % labels, 10 % padding). The optimizer is AdamW over the student
and the criterion's trainable parts; the teacher runs under ``no_grad`` in eval mode. Rows:

* ``cross_entropy``: student forward + backward + step (SFT).
* ``passes``: the model passes a KD step pays (student forward + backward of CE, teacher forward).
* ``dual_space_kd_with_cma``, ``mcw_kd:default``, ``mcw_kd:reference``: the whole KD step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_criteria import print_rows  # noqa: E402

ROWS = ("cross_entropy", "passes", "dual_space_kd_with_cma", "mcw_kd:default", "mcw_kd:reference")


def build_models(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dt = harness.DTYPES[args.dtype]
    s_layers = 12 if args.full_depth else args.student_layers
    t_layers = 24 if args.full_depth else args.teacher_layers
    student = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=768, n_head=12, n_layer=s_layers,
                                         n_positions=max(1024, max(args.lengths)))).to(args.device, dt)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=5504,
                                           num_hidden_layers=t_layers, num_attention_heads=16,
                                           num_key_value_heads=16, tie_word_embeddings=False,
                                           max_position_embeddings=max(2048, max(args.lengths))))
    teacher = teacher.to(args.device, dt).eval().requires_grad_(False)
    return student, teacher, s_layers, t_layers


def make_step(row, student, teacher, batch, args):
    import torch

    from mckd.criteria import get_criterion_class
    from mckd.criteria.common import count_tokens, cross_entropy_sum
    from mckd.criteria.mcw.presets import preset
    from mckd.models.loading import model_view

    name = row.split(":")[0]
    crit = None
    if name == "dual_space_kd_with_cma":
        crit = get_criterion_class(name)(768, 2048)
    elif name == "mcw_kd":
        crit = get_criterion_class(name)(768, 2048, options=preset(row.split(":")[1]), kd_rate=0.5)
    params = list(student.parameters())
    if crit is not None:
        crit = crit.to(args.device, harness.DTYPES[args.dtype])
        params += list(crit.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    need_teacher = row != "cross_entropy"
    need_hidden = crit is not None

    def step():
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=need_hidden)
        t_view = None
        if need_teacher:
            with torch.no_grad():
                t_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                                output_hidden_states=need_hidden)
            t_view = model_view(teacher, t_out, with_hidden=need_hidden)
        if crit is None:
            loss, _ = cross_entropy_sum(s_out.logits, batch["labels"])
        else:
            loss = crit(batch, model_view(student, s_out, with_hidden=True), t_view).loss_sum
        (loss / count_tokens(batch["labels"]).clamp_min(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    harness.add_common_args(p, memory=False)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--teacher-layers", type=int, default=1)
    p.add_argument("--full-depth", action="store_true", help="12-layer student, 24-layer teacher (GPU)")
    args = p.parse_args(argv)
    harness.configure_cpu(args.threads, not args.keep_denormals)
    student, teacher, s_layers, t_layers = build_models(args)
    print(f"# {harness.machine()}; B={args.batch}, {args.device}, {args.dtype}; student GPT-2 {s_layers} layers "
          f"(768, V 50257), teacher Qwen2 {t_layers} layer(s) (2048, V 151936); flush denormals "
          f"{not args.keep_denormals}", flush=True)
    results = []
    for T in args.lengths:
        batch = harness.make_inputs(args.batch, T, device=args.device, dtype=args.dtype, views=False).batch
        fns = {r: make_step(r, student, teacher, batch, args) for r in args.rows}
        times = harness.time_interleaved(fns, args.device, args.repeats)
        res = [{"row": r, "B": args.batch, "T": T, "device": args.device, "dtype": args.dtype,
                "student_layers": s_layers, "teacher_layers": t_layers, **harness.summary(times[r])}
               for r in args.rows]
        print_rows(res)
        med = {r["row"]: r["median_ms"] for r in res}
        if "dual_space_kd_with_cma" in med:
            for r in ("mcw_kd:default", "mcw_kd:reference"):
                if r in med:
                    print(f"# L={T}: step {r} / dual_space_kd_with_cma = "
                          f"{med[r] / med['dual_space_kd_with_cma']:.2f}x (target <= 1.3x)", flush=True)
        results.extend(res)
        del fns
    return harness.finish(results, args.json)


if __name__ == "__main__":
    sys.exit(main())

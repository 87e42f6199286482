"""On-policy step vs off-policy step, split into generation, re-tokenisation + alignment and the
training step (teacher forward, student forward + backward, criterion, optimizer).

Run (CPU by default, one torch thread; on a GPU add ``--device cuda --dtype bf16 --full-depth``)::

    python benchmarks/bench_on_policy.py                          # B=4, prompts <= 256, 256 new tokens
    python benchmarks/bench_on_policy.py --batch 2 --repeats 2 --json benchmarks/results/cpu_on_policy_steps.json
    python benchmarks/bench_on_policy.py --batch 2 --no-steps --json benchmarks/results/cpu_on_policy.json
    python benchmarks/bench_on_policy.py --device cuda --dtype bf16 --full-depth --batch 8

The published lengths: prompts of up to 256 student tokens (the ``--batch`` longest prompts of the
Dolly file, so the prompts are as long as the data allows), 256 new tokens, ``--max-length 512``.
Real tokenizers (GPT-2 student, Qwen1.5 teacher, from ../shared/model_hub); random-init models
built from configs (nothing downloaded):

* student: GPT-2 with GPT2-base widths and ``--student-layers`` layers (12 by default: GPT2-base);
* teacher: Qwen2 with Qwen1.5-1.8B widths and ``--teacher-layers`` layers (1 by default on CPU;
  ``--full-depth``: 24).

A random-init student almost never samples its eos, so every sample has the full 256 tokens, and
its text is a string of unrelated tokens (a hard case for the re-tokenisation: rarer merges, more
teacher tokens). The re-tokenisation + alignment row is also timed on the Dolly reference
responses of the same prompts (natural text, their own lengths: ``retok_align_dolly``).

Rows (median of ``--repeats`` interleaved rounds, :func:`harness.time_interleaved`):

* ``generation``: batched sampling of the on-policy responses (left padding, KV cache; T = 1);
* ``retok_align[:features]``: decode + :func:`mckd.data.build_batch` (both tokenisations, offsets
  and the alignment features listed: none, MinED's index, MCW-KD's DTW pairs, or both) + the
  eos masking, i.e. everything between the samples and the batch;
* ``step_on_policy`` / ``step_off_policy``: the training step of the criterion on the on-policy
  batch / on the cached batch of the same prompts with the dataset's responses;
* ``criterion_on_policy`` / ``criterion_off_policy``: the criterion alone (forward + backward) on
  those batches, on precomputed model outputs (the step minus it is the model passes + optimizer).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHARED = Path(os.environ.get("MCKD_SHARED", harness.ROOT.parent / "shared"))
FEATURES = {"none": (), "mined": ("mined_dtw",), "dtw": ("dtw",), "mined+dtw": ("mined_dtw", "dtw")}


def build_models(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    dt = harness.DTYPES[args.dtype]
    t_layers = 24 if args.full_depth else args.teacher_layers
    student = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=768, n_head=12, n_layer=args.student_layers,
                                         n_positions=1024)).to(args.device, dt)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=5504,
                                           num_hidden_layers=t_layers, num_attention_heads=16,
                                           num_key_value_heads=16, tie_word_embeddings=False,
                                           max_position_embeddings=2048))
    return student, teacher.to(args.device, dt).eval().requires_grad_(False), t_layers


def make_criterion_step(student, teacher, crit, batch, args):
    """``fn()``: the criterion alone (forward + backward) on ``batch``, outside the model passes:
    the student's logits and hidden states are precomputed leaves that require grad, the teacher's
    precomputed outputs are constant (as in :mod:`harness`)."""
    import torch

    from mckd.criteria.base import ModelView
    from mckd.criteria.common import count_tokens
    from mckd.models.loading import model_view

    batch = {k: v.to(args.device) for k, v in batch.items()}
    with torch.no_grad():
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
        t_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                        output_hidden_states=True)
    sv = model_view(student, s_out, with_hidden=True)
    s_view = ModelView(sv.logits.detach().requires_grad_(True), sv.hidden.detach().requires_grad_(True),
                       sv.embed_tokens, sv.lm_head)
    t_view = model_view(teacher, t_out, with_hidden=True)
    n = count_tokens(batch["labels"]).clamp_min(1)

    def fn():
        s_view.logits.grad = s_view.hidden.grad = None
        (crit(batch, s_view, t_view).loss_sum / n).backward()
        student.zero_grad(set_to_none=True)   # the criterion rows leave no gradient to the step rows
        crit.zero_grad(set_to_none=True)
    return fn


def make_train_step(student, teacher, args):
    """``step(batch)``: teacher forward, student forward + backward, MCW-KD (reference preset: it
    reads the DTW pairs), AdamW step; the criterion is ``step.criterion``."""
    import torch

    from mckd.criteria import get_criterion_class
    from mckd.criteria.common import count_tokens
    from mckd.criteria.mcw.presets import preset
    from mckd.models.loading import model_view

    crit = get_criterion_class("mcw_kd")(768, 2048, options=preset("reference"), kd_rate=0.5)
    crit = crit.to(args.device, harness.DTYPES[args.dtype])
    opt = torch.optim.AdamW([*student.parameters(), *crit.parameters()], lr=1e-5)

    def step(batch):
        batch = {k: v.to(args.device) for k, v in batch.items()}
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                            output_hidden_states=True)
        loss = crit(batch, model_view(student, s_out, with_hidden=True),
                    model_view(teacher, t_out, with_hidden=True)).loss_sum
        (loss / count_tokens(batch["labels"]).clamp_min(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.criterion = crit
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(p, memory=False)
    p.add_argument("--data", default=str(SHARED / "data" / "dolly" / "valid.jsonl"))
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=12)
    p.add_argument("--teacher-layers", type=int, default=1)
    p.add_argument("--full-depth", action="store_true", help="24-layer teacher (GPU)")
    p.add_argument("--no-steps", dest="steps", action="store_false",
                   help="skip the two training-step rows (generation and re-tokenisation only)")
    p.add_argument("--steps-once", action="store_true",
                   help="time the two training-step rows once each, in the first round, after one "
                        "shared warm-up step (CPU, B = 2: an on-policy MCW-KD step took ~33 s)")
    args = p.parse_args(argv)
    harness.configure_cpu(args.threads, not args.keep_denormals)

    from mckd.data import build_batch
    from mckd.data.examples import encode_prompt, read_examples
    from mckd.models.tokenizers import load_tokenizer
    from mckd.train.on_policy import OnPolicyBatches

    s_tok = load_tokenizer(str(SHARED / "model_hub" / "gpt2" / "gpt2-base"), what="student")
    t_tok = load_tokenizer(str(SHARED / "model_hub" / "qwen" / "Qwen1.5-1.8B"), what="teacher")
    examples = read_examples(args.data)
    lengths = [len(encode_prompt(s_tok, e.prompt, 10 ** 6)) for e in examples]
    chosen = sorted(range(len(examples)), key=lambda i: -lengths[i])[: args.batch]
    prompts = [examples[i].prompt for i in chosen]
    max_length = args.max_prompt_length + args.max_new_tokens
    common = dict(student_tokenizer=s_tok, teacher_tokenizer=t_tok, max_length=max_length,
                  max_prompt_length=args.max_prompt_length)
    off_batch = build_batch(prompts, [examples[i].outputs[0] for i in chosen], alignment=FEATURES["dtw"],
                            **common)
    makers = {name: OnPolicyBatches(ratio=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens, seed=0,
                                    prompts=prompts, alignment=feats, **common)
              for name, feats in FEATURES.items()}
    student, teacher, t_layers = build_models(args)
    step = make_train_step(student, teacher, args) if args.steps else None
    gen_maker = makers["dtw"]
    samples = gen_maker.sample(student, off_batch, seed=1)
    on_batch, stats = gen_maker.build(off_batch, *samples)
    n_new = [len(x) for x in samples[0]]
    print(f"# {harness.machine()}; B={args.batch}, {args.device}, {args.dtype}; student GPT-2 "
          f"{args.student_layers} layers (768, V 50257), teacher Qwen2 {t_layers} layer(s) (2048, V 151936); "
          f"prompts {[min(n, args.max_prompt_length) for n in sorted(lengths, reverse=True)[:args.batch]]} "
          "student tokens, "
          f"new tokens {n_new}; on-policy batch T_s={on_batch['input_ids'].shape[1]}, "
          f"T_t={on_batch['teacher_input_ids'].shape[1]}; off-policy batch T_s={off_batch['input_ids'].shape[1]}, "
          f"T_t={off_batch['teacher_input_ids'].shape[1]}; re-tokenised rows {stats['retokenized']:.2f}", flush=True)

    dolly = (off_batch, [s_tok.encode(examples[i].outputs[0], add_special_tokens=False) for i in chosen],
             [True] * args.batch)
    fns = {"generation": lambda: gen_maker.sample(student, off_batch, seed=1)}
    for name, m in makers.items():
        fns[f"retok_align:{name}"] = (lambda m=m: m.build(off_batch, *samples))
    fns["retok_align_dolly:mined+dtw"] = lambda: makers["mined+dtw"].build(*dolly)
    if args.steps:
        fns["step_on_policy"] = lambda: step(on_batch)
        fns["step_off_policy"] = lambda: step(off_batch)
        fns["criterion_on_policy"] = make_criterion_step(student, teacher, step.criterion, on_batch, args)
        fns["criterion_off_policy"] = make_criterion_step(student, teacher, step.criterion, off_batch, args)
    once = ("step_on_policy", "step_off_policy") if args.steps_once else ()
    if args.steps and args.steps_once:
        step(off_batch)  # AdamW allocates its state on the first step: not part of either row
    times = harness.time_interleaved(fns, args.device, args.repeats, once=once)
    rows = [{"row": n, "B": args.batch, "device": args.device, "dtype": args.dtype, **harness.summary(t)}
            for n, t in times.items()]
    med = {r["row"]: r["median_ms"] for r in rows}
    for r in rows:
        print(f"{r['row']:<28} median {r['median_ms']:10.1f} ms   min {r['min_ms']:10.1f} ms", flush=True)
    gen = med["generation"]
    for name in FEATURES:
        print(f"# retok_align:{name} / generation = {med[f'retok_align:{name}'] / gen:.4f}")
    if args.steps:
        on = gen + med["retok_align:dtw"] + med["step_on_policy"]
        print(f"# on-policy step (generation + retok_align:dtw + step_on_policy) = {on:.0f} ms = "
              f"{on / med['step_off_policy']:.1f}x the off-policy step ({med['step_off_policy']:.0f} ms)")
        print(f"# split of the on-policy step: generation {gen:.0f} ms, re-tokenisation + alignment "
              f"{med['retok_align:dtw']:.1f} ms, criterion {med['criterion_on_policy']:.0f} ms, model passes + "
              f"optimizer {med['step_on_policy'] - med['criterion_on_policy']:.0f} ms; off-policy step: criterion "
              f"{med['criterion_off_policy']:.0f} ms, model passes + optimizer "
              f"{med['step_off_policy'] - med['criterion_off_policy']:.0f} ms")
    return harness.finish(rows, args.json)


if __name__ == "__main__":
    sys.exit(main())

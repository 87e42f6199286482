"""Batched generation and the teacher-forced loss against per-example oracles (tiny real-vocab models)."""
from __future__ import annotations

import pytest
import torch

from mckd.evaluation.generate import (batch_seed, generate_batched, left_pad, plan_batches,
                                      strip_generated)
from mckd.evaluation.runner import teacher_forced_loss


def _load(path):
    from transformers import AutoModelForCausalLM

    from mckd.models.tokenizers import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(str(path))


def _prompts(tok, n=5, seed=0):
    from mckd.data.examples import render_prompt

    g = torch.Generator().manual_seed(seed)
    words = "the cat dog river sun blue green write explain list why how city".split()
    out = []
    for i in range(n):
        k = int(torch.randint(2, 15, (1,), generator=g))
        instr = " ".join(words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g))
        out.append(tok.encode(render_prompt(instr), add_special_tokens=False))
    return out


def test_plan_batches_covers_each_index_once_longest_first():
    lengths = [5, 9, 1, 9, 3, 7, 7]
    plan = plan_batches(lengths, 3)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    assert plan == plan_batches(lengths, 3) and [len(b) for b in plan] == [3, 3, 1]
    assert flat[:2] == [1, 3]  # ties broken by index
    with pytest.raises(ValueError):
        plan_batches(lengths, 0)
    assert batch_seed(10, 0) != batch_seed(10, 1) != batch_seed(20, 0)


def test_left_pad_and_strip():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    new = torch.tensor([[5, 6, 9, 9], [9, 9, 9, 9], [1, 2, 3, 4], [7, 8, 9, 3]])
    assert strip_generated(new, [9]) == [[5, 6], [], [1, 2, 3, 4], [7, 8]]
    assert strip_generated(new, [3, 9]) == [[5, 6], [], [1, 2], [7, 8]]


@pytest.mark.parametrize("family", ["gpt2", "llama2"])
def test_batched_greedy_equals_per_example_loop(tiny_models, family):
    model, tok = _load(tiny_models(family))
    prompts = _prompts(tok)
    batched = generate_batched(model, tok, prompts, batch_size=4, max_new_tokens=6, do_sample=False)
    loop = []
    for p in prompts:  # oracle: unpadded, one example at a time, plain generate
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=6, do_sample=False, no_repeat_ngram_size=6,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, len(p):].tolist()
        loop.append(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    assert batched == loop
    assert all(len(x) <= 6 for x in batched)


def test_sampling_seed_rng_mode_and_dtype(tiny_models):
    model, tok = _load(tiny_models("gpt2"))
    prompts = _prompts(tok, n=4, seed=1)
    model.train()
    state = torch.random.get_rng_state()
    a = generate_batched(model, tok, prompts, batch_size=2, max_new_tokens=5, seed=10)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert model.training and next(model.parameters()).dtype == torch.float32  # mode restored, no casts
    b = generate_batched(model, tok, prompts, batch_size=2, max_new_tokens=5, seed=10)
    c = generate_batched(model, tok, prompts, batch_size=2, max_new_tokens=5, seed=20)
    assert a == b and a != c


def test_wrapped_model_and_input_order(tiny_models):
    model, tok = _load(tiny_models("gpt2"))

    class Wrapper(torch.nn.Module):  # stands in for DDP / a DeepSpeed engine
        def __init__(self, m):
            super().__init__()
            self.module = m

    prompts = _prompts(tok, n=5, seed=2)
    direct = generate_batched(model, tok, prompts, batch_size=2, max_new_tokens=4, do_sample=False)
    wrapped = generate_batched(Wrapper(model), tok, prompts[::-1], batch_size=2, max_new_tokens=4, do_sample=False)
    assert wrapped == direct[::-1]
    assert generate_batched(model, tok, [], batch_size=2) == []
    with pytest.raises(ValueError, match="empty prompt"):
        generate_batched(model, tok, [[1], []], batch_size=2)
    with pytest.raises(ValueError, match="positions"):  # 1024-position tiny GPT-2
        generate_batched(model, tok, [[1] * 30], batch_size=1, max_new_tokens=1000)


@pytest.mark.parametrize("family", ["gpt2", "llama2"])
def test_teacher_forced_loss_matches_unpadded_loop(tiny_models, family):
    model, tok = _load(tiny_models(family))
    g = torch.Generator().manual_seed(0)
    top = min(1000, model.config.vocab_size)
    prompts = [torch.randint(10, top, (n,), generator=g).tolist() for n in (7, 3, 12, 5)]
    answers = [torch.randint(10, top, (n,), generator=g).tolist() for n in (4, 9, 1, 0)]
    got = teacher_forced_loss(model, prompts, answers, pad_id=tok.pad_token_id, device=torch.device("cpu"), chunk=3)
    for p, a, val in zip(prompts, answers, got):
        if not a:
            assert val != val  # nan for an empty answer
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0]
        ref = torch.nn.functional.cross_entropy(logits[len(p) - 1:-1], torch.tensor(a)).item()
        assert val == pytest.approx(ref, rel=1e-4, abs=1e-4)

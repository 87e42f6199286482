"""On-policy batches: the student's samples, re-tokenised and aligned on the fly, make a batch that
every criterion with a teacher accepts, equal to the cached pipeline's batch of the same text.

Tiny random-init GPT-2 (student) and Qwen (teacher) models with the stand-in tokenizers of
``conftest.py`` (different vocabularies); a same-vocabulary GPT-2 teacher for vanilla KD and DSKD. The
student samples its eos often (:func:`eos_prone_copy`), so batches mix finished samples and
samples cut at the token limit.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, write_word_data
from mckd.data import DistillCollator, build_dataset
from mckd.data import alignment as al
from mckd.data.batch import IGNORE_INDEX
from mckd.data.examples import encode_prompt, read_examples
from mckd.train import on_policy as op

ALIGN = (al.MINED, al.DTW)
KW = dict(max_length=64, max_prompt_length=32)


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    from mckd.models.tokenizers import load_tokenizer

    base = tmp_path_factory.mktemp("on_policy")
    paths = {"student": eos_prone_copy(tiny_models("gpt2"), base / "student"),
             "teacher": tiny_models("qwen", seed=1), "same": tiny_models("gpt2", seed=1)}
    toks = {k: load_tokenizer(str(p), what=k) for k, p in paths.items()}
    data = write_word_data(base / "data", n_train=8)
    return paths, toks, data, base


def eos_prone_copy(model_dir, out_dir, p_eos: float = 0.25):
    """A GPT-2 copy that samples its eos with probability ``p_eos`` at every position: the final
    norm outputs a constant vector ``c e_0`` (weight 0, bias on dimension 0), and the eos row of the
    tied embedding gets the dimension-0 value that gives it that probability. Sampled responses
    then end at different lengths, some before the token limit and some at it."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = 10.0
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = c
        wte = model.transformer.wte.weight
        others = torch.logsumexp(c * torch.cat([wte[: tok.eos_token_id, 0], wte[tok.eos_token_id + 1:, 0]]), 0)
        wte[tok.eos_token_id, 0] = (float(others) + math.log(p_eos / (1 - p_eos))) / c
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def cached_batch(data_file, s, t, rows, cache_dir, alignment=ALIGN, **kw):
    ds = build_dataset(data_file, student_tokenizer=s, teacher_tokenizer=t, alignment=alignment,
                       cache_dir=cache_dir, **{**KW, **kw})
    return DistillCollator(s.pad_token_id, t.pad_token_id, alignment=alignment)([ds[i] for i in rows])


def maker(setup, teacher="teacher", alignment=ALIGN, max_new_tokens=6, **kw):
    _, toks, data, _ = setup
    prompts = [e.prompt for e in read_examples(data / "train.jsonl")]
    return op.OnPolicyBatches(ratio=kw.pop("ratio", 1.0), temperature=1.0,
                              max_new_tokens=max_new_tokens, seed=kw.pop("seed", 3), prompts=prompts,
                              student_tokenizer=toks["student"], teacher_tokenizer=toks[teacher],
                              alignment=alignment, **KW, **kw)


def test_prompt_ids_are_the_students_prompt(setup):
    _, toks, data, base = setup
    s = toks["student"]
    batch = cached_batch(data / "train.jsonl", s, toks["teacher"], [3, 0, 5], base)
    examples = read_examples(data / "train.jsonl")
    want = [encode_prompt(s, examples[i].prompt, KW["max_prompt_length"]) for i in (3, 0, 5)]
    assert op.prompt_ids(batch) == want


def test_drop_unfinished_eos():
    labels = torch.tensor([[-100, 5, 6, 9, -100], [-100, 7, 9, -100, -100], [-100, 4, 4, 4, 4]])
    batch = {"labels": labels, "teacher_labels": labels.clone(),
             "mined_teacher_index": torch.tensor([[-1, 1, 2, 3, -1], [-1, 1, 2, -1, -1], [-1, 1, 2, 3, 4]])}
    out = op.drop_unfinished_eos(batch, torch.tensor([True, False, True]), student_eos=9, teacher_eos=9)
    assert out["labels"].tolist() == [[-100, 5, 6, -100, -100], [-100, 7, 9, -100, -100],
                                      [-100, 4, 4, 4, 4]]  # row 2: cut by max_length, no eos
    assert torch.equal(out["teacher_labels"], out["labels"])
    assert out["mined_teacher_index"][0].tolist() == [-1, 1, 2, -1, -1]
    assert torch.equal(batch["labels"], labels)  # inputs are not modified


def test_on_the_fly_batch_equals_the_cached_one(setup, tmp_path):
    """Hand-picked samples (finished, cut at the limit, a split the tokenizer would not make) give
    the cached pipeline's batch of the same texts, with the eos label only where generated."""
    _, toks, data, base = setup
    s, t = toks["student"], toks["teacher"]
    m = maker(setup, max_new_tokens=4)
    rows = [2, 6, 4]
    batch = cached_batch(data / "train.jsonl", s, t, rows, base)
    enc = [s.encode(x, add_special_tokens=False) for x in (" zeta eta", " beta gamma delta.")]
    split = s.encode(" alpha", add_special_tokens=False)
    pieces = [s.convert_tokens_to_ids(c) for c in s.convert_ids_to_tokens(split)[0]]  # one per char
    responses = [enc[0], enc[1][:4], pieces[:4]]
    finished = [True, False, False]  # rows 1 and 2 reached the 4-token limit
    got, stats = m.build(batch, responses, finished)

    texts = s.batch_decode(responses, skip_special_tokens=True)
    prompts = [e.prompt for e in read_examples(data / "train.jsonl")]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"prompt": prompts[i], "output": x}) + "\n"
                         for i, x in zip(rows, texts)))
    want = cached_batch(f, s, t, range(len(rows)), tmp_path)
    want["example_index"] = torch.tensor(rows)
    for b, fin in enumerate(finished):  # oracle: drop the last (eos) label of unfinished rows
        if not fin:
            for key, eos in (("labels", s.eos_token_id), ("teacher_labels", t.eos_token_id)):
                p = int((want[key][b] != IGNORE_INDEX).nonzero().max())
                assert want[key][b, p] == eos
                want[key][b, p] = IGNORE_INDEX
                if key == "labels":
                    want["mined_teacher_index"][b, p] = -1
    assert sorted(got) == sorted(want) == sorted(batch)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # labels cover the sampled tokens (+ eos when generated); row 2 was re-tokenised
    for b, (r, fin) in enumerate(zip(responses, finished)):
        lab = [x for x in got["labels"][b].tolist() if x != IGNORE_INDEX]
        assert (lab == r + [s.eos_token_id] * fin) == (b != 2)
    assert stats == {"retokenized": pytest.approx(1 / 3), "finished": pytest.approx(1 / 3)}
    assert (got["mined_teacher_index"] >= 0).any() and got["dtw_mask"].any()


def test_empty_sample_keeps_its_eos(setup):
    """A sample of special tokens only decodes to nothing: its row keeps the eos label (the cached
    path refuses empty responses; the batch must still be valid)."""
    _, toks, data, base = setup
    s, t = toks["student"], toks["teacher"]
    batch = cached_batch(data / "train.jsonl", s, t, [0, 3], base)
    got, stats = maker(setup, max_new_tokens=2).build(batch, [[], [s.eos_token_id] * 2], [True, False])
    for key, eos in (("labels", s.eos_token_id), ("teacher_labels", t.eos_token_id)):
        assert [[x for x in row if x != IGNORE_INDEX] for row in got[key].tolist()] == [[eos]] * 2
    assert stats["finished"] == 1.0 and stats["retokenized"] == 0.5


def test_sampling_is_seeded_and_leaves_the_global_rng(setup):
    from transformers import AutoModelForCausalLM

    paths, toks, data, base = setup
    model = AutoModelForCausalLM.from_pretrained(paths["student"]).train()
    batch = cached_batch(data / "train.jsonl", toks["student"], toks["teacher"], [0, 1, 2], base)
    m = maker(setup)
    rng = torch.get_rng_state()
    a, sa = m.make_batch(model, batch, seed=11)
    b, _ = m.make_batch(model, batch, seed=11)
    c, _ = m.make_batch(model, batch, seed=12)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"]) or a["input_ids"].shape != c["input_ids"].shape
    assert not torch.equal(a["labels"], batch["labels"]) or a["labels"].shape != batch["labels"].shape
    assert 0.0 <= sa["retokenized"] <= 1.0


def test_coins_and_seeds(setup):
    m = maker(setup, ratio=0.3, alignment=())
    coins = [m.is_on_policy(step, i) for step in range(500) for i in range(4)]
    assert coins == [m.is_on_policy(step, i) for step in range(500) for i in range(4)]
    assert 0.26 < sum(coins) / len(coins) < 0.34
    other_rank = maker(setup, ratio=0.3, rank=1, alignment=())
    assert coins[:40] == [other_rank.is_on_policy(step, i) for step in range(10) for i in range(4)]
    seeds = {m.sample_seed(s, i) for s in range(50) for i in range(4)}
    assert len(seeds) == 200 and m.sample_seed(7, 1) != other_rank.sample_seed(7, 1)
    assert all(maker(setup, ratio=1.0, alignment=()).is_on_policy(s, 0) for s in range(100))


def test_replace_keeps_off_policy_batches_and_logs(setup):
    from transformers import AutoModelForCausalLM

    paths, toks, data, base = setup
    model = AutoModelForCausalLM.from_pretrained(paths["student"])
    micro = [cached_batch(data / "train.jsonl", toks["student"], toks["teacher"], r, base)
             for r in ([0, 1], [2, 3], [4, 5], [6, 7])]
    m = maker(setup, ratio=0.5, seed=0)
    coins = [m.is_on_policy(5, i) for i in range(4)]
    assert 0 < sum(coins) < 4  # this seed gives a mix
    acc: dict = {}
    out = m.replace(micro, 5, model, acc, torch.device("cpu"))
    for b, o, coin in zip(micro, out, coins):
        assert (o is b) != coin
        assert bool(o.get("on_policy", False)) == coin   # criteria drop their CE on these
    assert float(acc["stat/on_policy"]) == sum(coins)
    assert set(acc) == {"stat/on_policy", "stat/on_policy_finished", "stat/on_policy_retokenized"}


def _criterion(name, paths, toks, teacher, *extra, models=(None, None)):
    from mckd.config import parse_config
    from mckd.criteria.base import CriterionResources, get_criterion_class
    from mckd.models.loading import read_dims

    pc = str(ROOT / "configs" / "projector_config.json")
    argv = ["--model-path", str(paths["student"]), "--teacher-model-path", str(paths[teacher]),
            "--data-dir", "unused", "--save-dir", "unused", "--lr", "1e-3", "--criterion", name,
            "--projector-config-path", pc, *extra]
    options = parse_config(argv, check_paths=False).criterion_options
    dims = read_dims(str(paths["student"]), str(paths[teacher]))
    res = CriterionResources(toks["student"], toks[teacher], False, *models)
    return get_criterion_class(name).from_options(options, dims, res)


CRITERIA = {  # name -> (teacher, extra flags)
    "various_divergence": ("same", ["--kd-objective", "js_divergence"]),
    "dual_space_kd": ("same", []),
    "dual_space_kd_with_cma": ("teacher", []),
    "universal_logit_distillation": ("teacher", []),
    "min_edit_dis_kld": ("teacher", ["--teacher-to-student-id-mapping"]),
    "multi_level_ot": ("teacher", []),
    "mcw_kd": ("teacher", ["--mcw-top-k", "20"]),
    "mcw_kd:reference": ("teacher", ["--mcw-preset", "reference", "--mcw-top-k", "20"]),
    "mcw_kd:exact": ("teacher", ["--mcw-top-k", "20", "--exact-align"]),
    "dual_space_kd_v2": ("teacher", []),
    "uld_hybrid": ("teacher", []),
    "dwa_kd": ("teacher", []),
}


def test_every_teacher_criterion_is_covered():
    import mckd.criteria as criteria

    with_teacher = {n for n in criteria.known_criteria()
                    if criteria.get_criterion_class(n).needs_teacher and not n.startswith("test_")}
    assert with_teacher <= {n.split(":")[0] for n in CRITERIA}


@pytest.mark.parametrize("name", list(CRITERIA))
def test_sampled_batch_is_valid_for_every_criterion(setup, mined_map, name):
    """Sampled batches carry the keys, masks, labels and alignment tensors of a cached batch, and
    the criterion gives a finite loss with finite gradients on them."""
    from transformers import AutoModelForCausalLM

    from mckd.criteria.common import count_tokens
    from mckd.models.loading import model_view
    from mckd.train.engine import model_inputs

    paths, toks, data, base = setup
    teacher_name, extra = CRITERIA[name]
    if "--teacher-to-student-id-mapping" in extra:
        extra = extra + [str(mined_map("tiny-qwen", "tiny-gpt2"))]
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    teacher = AutoModelForCausalLM.from_pretrained(paths[teacher_name]).eval()
    crit = _criterion(name.split(":")[0], paths, toks, teacher_name, *extra, models=(student, teacher))
    s, t = toks["student"], toks[teacher_name]
    cached = cached_batch(data / "train.jsonl", s, t, [1, 4, 7], base, alignment=crit.alignment)
    m = maker(setup, teacher=teacher_name, alignment=crit.alignment, max_new_tokens=8)
    batch, stats = m.make_batch(student, cached, seed=8)   # a seed whose samples end both ways
    assert 0.0 < stats["finished"] < 1.0  # samples that end with eos and samples cut at the limit

    assert sorted(batch) == sorted(cached)
    for pre, tok in (("", s), ("teacher_", t)):
        ids, mask, labels = (batch[pre + k] for k in ("input_ids", "attention_mask", "labels"))
        n = mask.sum(1)
        assert torch.equal(mask, (torch.arange(ids.shape[1])[None] < n[:, None]).long())
        assert ((labels != IGNORE_INDEX) <= mask.bool()).all()
        assert ((labels != IGNORE_INDEX).sum(1) > 0).all()
        assert torch.equal(batch[pre + "position_ids"], (torch.arange(ids.shape[1]) * mask))
        assert (batch[pre + "offsets"][..., 0] <= batch[pre + "offsets"][..., 1]).all()
        # the prompt is kept: same prompt tokens as the cached batch
        assert op.prompt_ids({"input_ids": ids, "labels": labels}) == op.prompt_ids(
            {"input_ids": cached[pre + "input_ids"], "labels": cached[pre + "labels"]})
    if al.MINED in crit.alignment:
        idx = batch["mined_teacher_index"]
        assert ((idx >= 0) <= (batch["labels"] != IGNORE_INDEX)).all()
        assert (idx < batch["teacher_attention_mask"].sum(1, keepdim=True)).all()
    if al.DTW in crit.alignment:
        pairs = batch["dtw_index"][batch["dtw_mask"]]
        assert pairs.numel() > 0 and (pairs >= 0).all()
        assert (pairs[:, 0] < batch["teacher_input_ids"].shape[1]).all()
        assert (pairs[:, 1] < batch["input_ids"].shape[1]).all()

    need_h = crit.needs_hidden
    out = student(**model_inputs(student, batch), output_hidden_states=need_h, use_cache=False)
    with torch.no_grad():
        t_out = teacher(**model_inputs(teacher, batch, "teacher_"), output_hidden_states=need_h,
                        use_cache=False)
    views = (model_view(student, out, with_hidden=need_h), model_view(teacher, t_out, with_hidden=need_h))
    loss, n_tok, metrics = crit(batch, *views)
    assert int(n_tok) == int(count_tokens(batch["labels"])) > 0
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    # marked on-policy, the same batch loses exactly its CE term: (1 - kd_rate) CE or CE
    with torch.no_grad():
        on = crit({**batch, "on_policy": torch.ones((), dtype=torch.bool)}, *views)
    weight = float((loss.detach() - on.loss_sum) / metrics["nll_loss"])
    rate = float(getattr(crit, "kd_rate", 0.0))
    assert min(abs(weight - 1.0), abs(weight - (1.0 - rate))) < 1e-4, (weight, rate)
    (loss / n_tok).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_flags_are_validated():
    from mckd.config import ConfigError, parse_config

    def parse(*extra, criterion="mcw_kd"):
        return parse_config(["--model-path", "m", "--teacher-model-path", "t", "--data-dir", "d",
                             "--save-dir", "s", "--lr", "1e-3", "--criterion", criterion,
                             "--max-length", "64", "--max-prompt-length", "24", *extra],
                            check_paths=False)

    assert parse().train.on_policy_ratio == 0.0
    assert parse().derived["on_policy_max_new_tokens"] == 40
    assert parse("--on-policy-max-new-tokens", "7").derived["on_policy_max_new_tokens"] == 7
    for extra, flag in ((("--on-policy-ratio", "1.5"), "--on-policy-ratio"),
                        (("--on-policy-ratio", "-0.1"), "--on-policy-ratio"),
                        (("--on-policy-temperature", "0"), "--on-policy-temperature"),
                        (("--on-policy-max-new-tokens", "0"), "--on-policy-max-new-tokens")):
        with pytest.raises(ConfigError, match=flag):
            parse(*extra)
    with pytest.raises(ConfigError, match="--on-policy-ratio: criterion 'cross_entropy' uses no teacher"):
        parse("--on-policy-ratio", "0.5", criterion="cross_entropy")

"""Cross-tokenizer alignment features against a pure-Python oracle of the published DTW."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from mckd.data import DistillCollator, build_dataset
from mckd.data import alignment as al


# --------------------------------------------------------------------------- oracle
def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def oracle_dtw(n: int, m: int, dist) -> list[tuple[int, int]]:
    """The published simple DTW, cell by cell: infinite borders, greedy backtracking from the end
    choosing the smallest of (diagonal, up, left), first one on ties."""
    inf = float("inf")
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            D[i + 1][j + 1] = dist(i, j) + min(D[i][j + 1], D[i + 1][j], D[i][j])
    D = [row[1:] for row in D[1:]]
    i, j = n - 1, m - 1
    path = []
    while i > 0 or j > 0:
        path.append((i, j))
        opts = [D[i - 1][j - 1] if i > 0 and j > 0 else inf,
                D[i - 1][j] if i > 0 else inf,
                D[i][j - 1] if j > 0 else inf]
        move = opts.index(min(opts))
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    return path[::-1]


def oracle_mined(stu_tokens, tea_tokens):
    """Student content index -> teacher content index when exactly one is aligned, else -1."""
    path = oracle_dtw(len(tea_tokens), len(stu_tokens),
                      lambda i, j: levenshtein(tea_tokens[i], stu_tokens[j]))
    per_student = [[] for _ in stu_tokens]
    for t, s in path:
        per_student[s].append(t)
    return [v[0] if len(v) == 1 else -1 for v in per_student]


def oracle_c2(stu_tokens, tea_tokens):
    """Published C2_dtw = (C_s2t^T + C_t2s) / 2, (M, N)."""
    N, M = len(stu_tokens), len(tea_tokens)
    c_s2t, c_t2s = np.zeros((N, M)), np.zeros((M, N))
    for i, j in oracle_dtw(N, M, lambda i, j: levenshtein(stu_tokens[i], tea_tokens[j])):
        c_s2t[i, j] = levenshtein(stu_tokens[i], tea_tokens[j])
    for j, i in oracle_dtw(M, N, lambda j, i: levenshtein(tea_tokens[j], stu_tokens[i])):
        c_t2s[j, i] = levenshtein(tea_tokens[j], stu_tokens[i])
    return (c_s2t.T + c_t2s) / 2


# --------------------------------------------------------------------------- DTW core
@pytest.mark.parametrize("seed", range(6))
def test_dtw_path_matches_oracle_on_random_costs(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n, m = (int(x) for x in rng.integers(1, 30, size=2))
        cost = rng.integers(0, 3 if seed % 2 else 8, size=(n, m))  # small ranges: many ties
        ref = oracle_dtw(n, m, lambda i, j: float(cost[i, j]))
        assert al.dtw_path(cost) == ref, (n, m)
        # greedy backtracking follows optimal predecessors: the path cost is the DTW value
        assert al.dtw_accumulated(cost)[-1, -1] == sum(cost[i, j] for i, j in ref)


def test_dtw_edge_shapes():
    assert al.dtw_path(np.zeros((1, 1), dtype=int)) == [(0, 0)]
    assert al.dtw_path(np.array([[1, 0, 2]])) == [(0, 0), (0, 1), (0, 2)]
    assert al.dtw_path(np.array([[1], [0], [2]])) == [(0, 0), (1, 0), (2, 0)]
    assert al.dtw_path(np.zeros((0, 3), dtype=int)) == []
    zeros = np.zeros((4, 4), dtype=int)  # all ties: the diagonal is preferred
    assert al.dtw_path(zeros) == [(k, k) for k in range(4)]


def random_tokens(rng, n):
    alphabet = "abcĠ▁ "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(n)]


def test_features_match_oracle_on_random_tokens():
    rng = random.Random(0)
    for _ in range(30):
        s, t = random_tokens(rng, rng.randint(1, 25)), random_tokens(rng, rng.randint(1, 25))
        assert al.levenshtein_matrix(s, t).tolist() == [[levenshtein(a, b) for b in t] for a in s]
        got = al.mined_teacher_index(s, t, 3, 5, len(s) + 3)
        ref = oracle_mined(s, t)
        assert got == [-1] * 3 + [r + 5 if r >= 0 else -1 for r in ref]
        pairs, values = al.dtw_pairs(s, t)
        dense = al.dense_dtw_cost(torch.tensor([pairs]), torch.tensor([values]),
                                  torch.ones(1, len(values), dtype=torch.bool), len(t), len(s))
        np.testing.assert_allclose(dense[0].numpy(), oracle_c2(s, t))


# --------------------------------------------------------------------------- real tokenizers
@pytest.fixture(scope="module")
def toks(any_tokenizer):
    return any_tokenizer


PAIRS = [("tiny-gpt2", "tiny-qwen"), ("tiny-tinyllama", "tiny-mistral")]  # real pairs: test_published_assets


def check_word_markers(tok_of, prefix):
    for name, marker in (("gpt2", "Ġ"), ("qwen", "Ġ"), ("tinyllama", "▁"), ("mistral", "▁"), ("llama2", "▁")):
        assert al.word_marker(tok_of(prefix + name)) == marker, name


def test_word_marker_from_vocabulary(toks):
    check_word_markers(toks, "tiny-")


RECORDS = [
    {"instruction": "Name three primary colours.", "output": "Red, blue and yellow."},
    {"instruction": "Explain DTW.", "input": "In one sentence, please!",
     "output": "Dynamic time warping aligns two sequences — e.g. tokens — at minimal cost 🙂."},
]


def rows_for(path, s, t, tmp_path, limit=-1):
    ds = build_dataset(path, student_tokenizer=s, teacher_tokenizer=t, alignment=("mined_dtw", "dtw"),
                       cache_dir=tmp_path / "cache", limit=limit)
    rows = [ds[i] for i in range(len(ds))]
    return rows, DistillCollator(s.pad_token_id, t.pad_token_id, ("mined_dtw", "dtw"))(rows)


def check_against_oracle(batch, s, t):
    ms, mt = al.word_marker(s), al.word_marker(t)
    B = batch["input_ids"].shape[0]
    dense = al.dense_dtw_cost(batch["dtw_index"], batch["dtw_value"], batch["dtw_mask"],
                              batch["teacher_input_ids"].shape[1], batch["input_ids"].shape[1])
    for b in range(B):
        sl, tl = batch["labels"][b] != -100, batch["teacher_labels"][b] != -100
        s_pos, t_pos = sl.nonzero()[:, 0], tl.nonzero()[:, 0]
        s_tok = [x.replace(ms, "") for x in s.convert_ids_to_tokens(batch["input_ids"][b, s_pos].tolist())]
        t_tok = [x.replace(mt, "") for x in t.convert_ids_to_tokens(batch["teacher_input_ids"][b, t_pos].tolist())]
        expected = torch.full_like(batch["input_ids"][b], -1)
        ref = torch.tensor(oracle_mined(s_tok, t_tok))
        expected[s_pos] = torch.where(ref >= 0, t_pos[ref.clamp_min(0)], -1)
        assert torch.equal(batch["mined_teacher_index"][b], expected)
        # MCW edit cost over all non-padding positions, markers and special tokens kept
        ns, nt = int(batch["attention_mask"][b].sum()), int(batch["teacher_attention_mask"][b].sum())
        c2 = oracle_c2(s.convert_ids_to_tokens(batch["input_ids"][b, :ns].tolist()),
                       t.convert_ids_to_tokens(batch["teacher_input_ids"][b, :nt].tolist()))
        np.testing.assert_allclose(dense[b, :nt, :ns].numpy(), c2)
        assert dense[b, nt:].abs().sum() == 0 and dense[b, :, ns:].abs().sum() == 0
        assert (batch["dtw_value"][b][~batch["dtw_mask"][b]] == 0).all()


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_batch_features_match_oracle(tmp_path, toks, student, teacher):
    check_batch_features(tmp_path, toks(student), toks(teacher))


def check_batch_features(tmp_path, s, t):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    rows, batch = rows_for(path, s, t, tmp_path)
    check_against_oracle(batch, s, t)
    # aligned pairs are mostly identical tokens after stripping: a sanity check of the direction
    idx = batch["mined_teacher_index"]
    aligned = (idx >= 0).nonzero()
    assert len(aligned) > 0.5 * int((batch["labels"] != -100).sum())
    # padding: P is the longest path list of the batch, the mask covers exactly each row's pairs
    assert batch["dtw_mask"].sum(1).tolist() == [len(r["dtw_value"]) for r in rows]

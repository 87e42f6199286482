"""Cross-tokenizer alignment features, computed once per example in the cached data pipeline.

A criterion lists the features it needs in ``Criterion.alignment``; :func:`mckd.data.build_dataset`
computes them inside its cached ``datasets.map`` and :class:`mckd.data.DistillCollator` pads them;
:func:`mckd.data.build_batch` does both for a batch of raw text.
Batch keys (``B`` batch, ``T_s``/``T_t`` student/teacher length, ``P`` longest path list):

``"mined_dtw"`` (MinED token alignment):
    mined_teacher_index  (B, T_s) long   for each student label position (``labels != -100``) the
                                         teacher input position aligned to it by the token DTW if
                                         exactly one teacher token is aligned to it, else -1;
                                         -1 on every non-label position.
    The DTW runs over the *content* tokens of each side (input tokens at label positions), with
    the word markers "Ġ"/"▁" stripped and Levenshtein distance as the local cost. The marker of a
    tokenizer is read from its vocabulary (:func:`word_marker`), not from a class table
    (the published table raised KeyError on tokenizer classes it did not list).

``"dtw"`` (MCW-KD hidden-level edit cost):
    dtw_index  (B, P, 2) long     pairs ``[teacher_pos, student_pos]`` on the warping paths of
                                  DTW(student, teacher) and DTW(teacher, student)
    dtw_value  (B, P) float32     0.5 * Levenshtein(token_s, token_t) of each pair
    dtw_mask   (B, P) bool        True on real pairs, False on padding
    Both passes run over all non-padding input positions with markers kept and special tokens
    kept (the published ``skip_special_tokens=True`` shifted token and hidden-state indices).
    Scatter-adding the pairs into a zero (B, T_t, T_s) tensor (:func:`dense_dtw_cost`) gives the
    published ``C2_dtw = (C_s2t^T + C_t2s) / 2`` exactly.

``"exact"`` (exact token alignment, read by ``dual_space_kd_v2``, ``uld_hybrid``, ``dwa_kd`` and
MCW-KD's ``--mcw-exact-kl-weight``):
    exact_teacher_index     (B, T_s) long  for each student position ``i`` the teacher position
                                           ``j`` whose *label* token covers exactly the same
                                           characters as the student's label token at ``i`` and
                                           follows the same character boundary, else -1
    boundary_teacher_index  (B, T_s) long  the teacher position ``j`` whose label token *ends*
                                           at the same character boundary as the student's (both
                                           tokenizations cut the text there), else -1
    Computed from the character offsets of both tokenizations (:func:`token_closes`,
    :func:`exact_teacher_index`): a token *closes* a boundary at its end offset unless the next
    token ends at the same character (a byte piece of one character); the eos appended to the
    response closes at ``len(text) + 1``. Label position ``i`` predicts sequence token ``i + 1``,
    so ``i`` and ``j`` are boundary pairs when tokens ``i + 1`` and ``j + 1`` close the same
    boundary, and exact pairs when tokens ``i`` and ``j`` also close one same boundary (then both
    label tokens span ``[previous boundary, boundary)`` and both contexts end at the same
    character). Only end offsets are used, so tokenizers that do or do not count a leading space
    in a token's offsets agree. Exact pairs are boundary pairs; positions between two boundary
    pairs form a *group* (several tokens on one side or both) that covers the same text.

DTW here is the published one (FuseLLM's simple DTW): ``D(i,j) = c(i,j) + min(D(i-1,j),
D(i,j-1), D(i-1,j-1))`` with ``D(-1,-1) = 0`` and infinite borders, then a greedy walk back from
the last cell to (0,0) that moves to the smallest of (diagonal, up, left) neighbours, ties in that
order. The local cost matrix comes from one ``rapidfuzz.process.cdist`` call and the recurrence is
solved one row at a time with a min-plus prefix scan in numpy (exact integer arithmetic, so ties
are resolved exactly as in the published float code, whose values are small integers too).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

MINED = "mined_dtw"
DTW = "dtw"
EXACT = "exact"
KNOWN_ALIGNMENTS = (MINED, DTW, EXACT)
WORD_MARKERS = ("Ġ", "▁")
# keys produced per alignment name (per example and in the batch)
ALIGNMENT_KEYS = {MINED: ("mined_teacher_index",), DTW: ("dtw_index", "dtw_value", "dtw_mask"),
                  EXACT: ("exact_teacher_index", "boundary_teacher_index")}


def check_alignment_names(names) -> tuple[str, ...]:
    """Validate and normalise the ``alignment`` argument (a tuple of known names)."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(dict.fromkeys(names or ()))
    unknown = [n for n in names if n not in KNOWN_ALIGNMENTS]
    if unknown:
        raise ValueError(f"unknown alignment feature(s) {unknown}; known: {list(KNOWN_ALIGNMENTS)}")
    return names


# --------------------------------------------------------------------------- token strings
def word_marker(tokenizer) -> str:
    """The word-boundary marker of a tokenizer ("Ġ" byte-level BPE, "▁" SentencePiece, or "").

    Decided from the vocabulary: the marker that starts the most token strings, if it starts at
    least 1% of them. Works for any tokenizer class (the published class table raised KeyError).
    """
    vocab = tokenizer.get_vocab()
    counts = {m: sum(1 for t in vocab if t.startswith(m)) for m in WORD_MARKERS}
    best = max(WORD_MARKERS, key=lambda m: counts[m])
    return best if counts[best] >= 0.01 * max(1, len(vocab)) else ""


def feature_markers(student_tokenizer, teacher_tokenizer, alignment) -> tuple[str, str]:
    """``(student, teacher)`` word markers that the features in ``alignment`` strip: those of
    :func:`word_marker` when ``"mined_dtw"`` is requested, else ``("", "")`` (``"dtw"`` keeps them).
    Reading a large vocabulary takes a moment: compute this once when building many batches."""
    if MINED not in check_alignment_names(alignment):
        return "", ""
    return word_marker(student_tokenizer), word_marker(teacher_tokenizer)


def token_strings(tokenizer, ids, strip: str = "") -> list[str]:
    """``convert_ids_to_tokens(ids)`` (special tokens kept), with ``strip`` removed if given."""
    toks = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    if strip:
        toks = [t.replace(strip, "") for t in toks]
    return toks


@functools.lru_cache(maxsize=1)
def _cdist():
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    return functools.partial(cdist, scorer=Levenshtein.distance, dtype=np.int32, workers=1)


def levenshtein_matrix(a: list[str], b: list[str]) -> np.ndarray:
    """(len(a), len(b)) int64 matrix of Levenshtein distances, in one compiled call."""
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.int64)
    return _cdist()(a, b).astype(np.int64)


# --------------------------------------------------------------------------- DTW
def dtw_accumulated(cost: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost ``D`` (N, M) for a local cost (N, M) of non-negative integers.

    Row ``i`` given row ``i-1``: with ``a_j = c_ij + min(D[i-1,j], D[i-1,j-1])`` the recurrence
    ``D[i,j] = min(a_j, c_ij + D[i,j-1])`` unrolls to ``D[i,j] = S_j + min_{k<=j}(a_k - S_k)``
    with ``S`` the cumulative sum of row ``i`` of ``c``: one prefix sum and one running minimum.
    ``S`` and ``c - S`` are computed for all rows at once, leaving four ufunc calls per row.
    The loop runs over the shorter side (the recurrence is symmetric under transposition).
    """
    c = np.ascontiguousarray(cost, dtype=np.int64)  # row slices below must be contiguous
    if c.ndim != 2:
        raise ValueError(f"DTW cost must be 2-D, got shape {c.shape}")
    if c.shape[0] > c.shape[1]:
        return dtw_accumulated(c.T).T
    n, m = c.shape
    D = np.empty((n, m), dtype=np.int64)
    if n == 0 or m == 0:
        return D
    S = np.cumsum(c, axis=1)      # (N, M) row prefix sums
    cs = c - S                    # (N, M) c_ij - S_ij
    D[0] = S[0]
    best = np.empty(m, dtype=np.int64)
    a = np.empty(m, dtype=np.int64)
    for i in range(1, n):
        prev = D[i - 1]
        best[0] = prev[0]
        np.minimum(prev[1:], prev[:-1], out=best[1:])
        np.add(cs[i], best, out=a)             # a_j - S_j
        np.minimum.accumulate(a, out=a)
        np.add(a, S[i], out=D[i])
    return D


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Warping path of the published DTW for a local cost (N, M): ``(i, j)`` pairs from (0, 0) to
    (N-1, M-1). Backtracking is greedy from the end: move to the smallest of the diagonal, up
    (i-1) and left (j-1) neighbours of ``D``, ties in that order. The walk (at most N+M steps)
    reads ``D`` through a memoryview, which costs far less than the O(N·M) fill."""
    D = dtw_accumulated(cost)
    n, m = D.shape
    if n == 0 or m == 0:
        return []
    d = memoryview(np.ascontiguousarray(D).reshape(-1))
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 and j > 0:
        k = i * m + j
        diag, up, left = d[k - m - 1], d[k - m], d[k - 1]
        if diag <= up and diag <= left:
            i -= 1
            j -= 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    while i > 0:      # column 0: only up
        i -= 1
        path.append((i, j))
    while j > 0:      # row 0: only left
        j -= 1
        path.append((i, j))
    path.reverse()
    return path


# --------------------------------------------------------------------------- per-example features
def mined_teacher_index(stu_tokens: list[str], tea_tokens: list[str], stu_label_start: int,
                        tea_label_start: int, n_stu: int) -> list[int]:
    """MinED alignment of one example: token DTW, then the one-to-one pairs.

    Args:
        stu_tokens: stripped token strings of the student *content* tokens (N_c).
        tea_tokens: stripped token strings of the teacher content tokens (M_c).
        stu_label_start / tea_label_start: input position of the first content token per side.
        n_stu: number of student input positions.

    Returns:
        list of length ``n_stu``: the teacher input position aligned one-to-one to each student
        content position, else -1.
    """
    out = [-1] * n_stu
    if not stu_tokens or not tea_tokens:
        return out
    # published call: dtw(teacher tokens, student tokens) -> rows teacher, columns student
    path = dtw_path(levenshtein_matrix(tea_tokens, stu_tokens))
    ti, sj = np.asarray(path, dtype=np.int64).T
    counts = np.bincount(sj, minlength=len(stu_tokens))
    only = counts[sj] == 1
    for t, s in zip(ti[only].tolist(), sj[only].tolist()):
        out[stu_label_start + s] = tea_label_start + t
    return out


def dtw_pairs(stu_tokens: list[str], tea_tokens: list[str]) -> tuple[list[list[int]], list[float]]:
    """MCW-KD edit-cost pairs of one example, both DTW passes.

    Returns:
        (pairs, values): ``pairs`` (P, 2) as ``[teacher_pos, student_pos]``, ``values`` (P,) the
        halved Levenshtein distance of each pair, so that summing them into a (T_t, T_s) matrix
        gives ``(C_s2t^T + C_t2s) / 2``.
    """
    lev = levenshtein_matrix(stu_tokens, tea_tokens)  # (N, M) student rows
    pairs: list[list[int]] = []
    values: list[float] = []
    for s, t in dtw_path(lev):            # DTW(student, teacher)
        pairs.append([t, s])
        values.append(0.5 * float(lev[s, t]))
    for t, s in dtw_path(lev.T):          # DTW(teacher, student)
        pairs.append([t, s])
        values.append(0.5 * float(lev[s, t]))
    return pairs, values


def token_closes(offsets, text_end: int, eos_last: bool) -> list[int]:
    """The character boundary each token closes, or -1 (exact alignment, one tokenization).

    Args:
        offsets: (n, 2) character spans of the tokens of one sequence, in order, *before* any
            truncation to ``max_length`` (so that the last kept token knows its successor).
        text_end: ``len(prompt + output)``.
        eos_last: the last token is the eos appended to the response (offset ``(end, end)``);
            it closes the virtual boundary ``text_end + 1``.

    Returns:
        list of n ints: ``end_k`` when the next token ends after ``end_k`` (or ``k`` is last),
        else -1 (a piece of a character that the next token finishes).
    """
    ends = np.asarray([int(o[1]) for o in offsets], dtype=np.int64)
    if eos_last and len(ends):
        ends[-1] = text_end + 1
    closes = ends.copy()
    if len(ends) > 1:
        closes[:-1] = np.where(ends[1:] > ends[:-1], ends[:-1], -1)
    return closes.tolist()


def exact_teacher_index(stu_closes, tea_closes, n_stu: int, n_tea: int) -> tuple[list[int], list[int]]:
    """Exact and boundary alignment of one example (label positions; see the module docstring).

    Args:
        stu_closes / tea_closes: :func:`token_closes` of the kept sequence tokens (at least
            ``n + 1`` entries each: inputs plus the last label token).
        n_stu / n_tea: number of input (= label) positions per side.

    Returns:
        ``(exact, boundary)``: two lists of length ``n_stu`` with a teacher position or -1.
    """
    cs = np.asarray(stu_closes[: n_stu + 1], dtype=np.int64)
    ct = np.asarray(tea_closes[: n_tea + 1], dtype=np.int64)
    exact = np.full(n_stu, -1, dtype=np.int64)
    boundary = np.full(n_stu, -1, dtype=np.int64)
    if n_stu == 0 or n_tea == 0:
        return exact.tolist(), boundary.tolist()
    s_lab, t_lab = cs[1:], ct[1:]                     # boundary closed by the label token of i
    s_ok, t_ok = np.flatnonzero(s_lab >= 0), np.flatnonzero(t_lab >= 0)
    _, si, ti = np.intersect1d(s_lab[s_ok], t_lab[t_ok], assume_unique=False, return_indices=True)
    i, j = s_ok[si], t_ok[ti]                         # boundary pairs (label positions)
    boundary[i] = j
    prev_same = (cs[i] >= 0) & (cs[i] == ct[j])       # the input tokens close one same boundary
    exact[i[prev_same]] = j[prev_same]
    return exact.tolist(), boundary.tolist()


def exact_alignment_share(labels_rows, index_rows) -> tuple[int, int]:
    """(exactly aligned label positions, label positions) over rows of a dataset (for logging)."""
    aligned = total = 0
    for labels, index in zip(labels_rows, index_rows):
        lab = np.asarray(labels) != -100
        aligned += int((lab & (np.asarray(index) >= 0)).sum())
        total += int(lab.sum())
    return aligned, total


# --------------------------------------------------------------------------- batch helpers
def dense_dtw_cost(dtw_index: torch.Tensor, dtw_value: torch.Tensor, dtw_mask: torch.Tensor,
                   teacher_len: int, student_len: int) -> torch.Tensor:
    """Scatter the DTW pairs of a batch into the published dense edit cost.

    Args:
        dtw_index: (B, P, 2) long ``[teacher_pos, student_pos]``.
        dtw_value: (B, P) float pair costs.
        dtw_mask: (B, P) bool, False on padding.
        teacher_len: T_t; student_len: T_s.

    Returns:
        (B, T_t, T_s) float32 ``C2_dtw``: zero off the warping paths.
    """
    B = dtw_index.shape[0]
    flat = dtw_index[..., 0] * student_len + dtw_index[..., 1]                 # (B, P)
    vals = torch.where(dtw_mask, dtw_value.float(), torch.zeros((), dtype=torch.float32,
                                                                device=dtw_value.device))
    out = torch.zeros(B, teacher_len * student_len, dtype=torch.float32, device=dtw_value.device)
    out.scatter_add_(1, flat.clamp_min(0), vals)
    return out.view(B, teacher_len, student_len)

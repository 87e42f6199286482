"""Shards of per-example teacher outputs: atomic writes, memory-mapped reads, batch collation, and
the reconstruction of the full-vocabulary logits a criterion reads.

One shard is a safetensors file holding ``n`` examples, their ``N`` teacher positions
concatenated along the first axis (one row per *input* token of the teacher tokenization, prompt
included, padding never stored)::

    example_index  (n,)      int64   row of the example in the training file
    offsets        (n + 1,)  int64   example i owns rows offsets[i]:offsets[i + 1]
    input_ids      (N,)      int32   the teacher input ids (checked against the dataset at read)
    topk_values    (N, K)    dtype   the K largest raw teacher logits of each position, descending
    topk_ids       (N, K)    int32   their vocabulary ids
    logsumexp      (N,)      fp32    log Z = logsumexp of all V logits
    tail_logmass   (N,)      fp32    log of the probability outside the top K (-inf when K = V)
    hidden         (N, D)    dtype   last-layer hidden states (when stored)

Reconstruction (:func:`dense_logits`): the top-K entries get their stored logits exactly; the
other V - K ids share the tail mass uniformly, each with logit ``log Z + tail_logmass - log(V - K)``,
so the log-partition and the top-K log-probabilities are those of the live teacher; with K = V the
logits are the stored ones, exactly. Log-probabilities are shift-invariant, so raw logits (not
log-probabilities) are stored: criteria that read logit values see the same numbers.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mckd.teacher_cache.manifest import SHARD_DIR, WEIGHTS_FILE, TeacherCacheError, read_manifest

SHARD_KEYS = ("example_index", "offsets", "input_ids", "topk_values", "topk_ids", "logsumexp",
              "tail_logmass")
# Keys the collator adds to the batch; the cached teacher source removes them before the criterion.
BATCH_PREFIX = "teacher_cache_"
ROW_KEYS = ("topk_values", "topk_ids", "logsumexp", "tail_logmass", "hidden")
MASK_KEY = BATCH_PREFIX + "mask"
TAIL_FLOOR = 1e3  # a tail logit is at least log Z - 1000: finite where the tail mass underflows


def shard_name(i: int) -> str:
    return f"{SHARD_DIR}/shard-{i:05d}.safetensors"


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write a shard atomically: a temporary file in the same directory, flushed to disk, then
    ``os.replace``. A killed build leaves either the whole shard or only a ``.tmp`` file.
    Returns the file size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def check_shard_file(path: Path, expected_bytes: int | None, *, what: str) -> None:
    """Raise a :class:`TeacherCacheError` when a shard is missing or has another size."""
    if not path.is_file():
        raise TeacherCacheError(f"{what}: shard {path} is missing; rebuild the cache (the build "
                                "command resumes and writes only the missing shards)")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise TeacherCacheError(f"{what}: shard {path} is truncated or altered ({size} bytes, the "
                                f"manifest records {expected_bytes}); delete it and rerun the build "
                                "command to rewrite it")


def open_shard(path: Path, *, what: str):
    """``safe_open`` (memory-mapped) with the shard named in any error."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise TeacherCacheError(f"{what}: cannot read shard {path} ({e}); delete it and rerun the "
                                "build command to rewrite it") from None


def dense_logits(values: torch.Tensor, ids: torch.Tensor, logsumexp: torch.Tensor,
                 tail_logmass: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary teacher logits from the top-K entries and the tail mass.

    Args:
        values: (B, T, K) stored top-K logits. ids: (B, T, K) their ids (any integer dtype).
        logsumexp: (B, T) fp32 log Z. tail_logmass: (B, T) fp32 log of the mass outside the top K.
        mask: (B, T) bool, True on stored positions (padding: every logit 0).
        vocab: V, the logit width of the teacher.

    Returns:
        (B, T, V) in ``values.dtype``: stored logits at the top-K ids, ``log Z + tail_logmass -
        log(V - K)`` (at least ``log Z - 1000``) at the others.
    """
    B, T, K = values.shape
    if K > vocab:
        raise ValueError(f"dense_logits: {K} stored entries for a vocabulary of {vocab}")
    if K < vocab:
        fill = torch.maximum(logsumexp + tail_logmass - math.log(vocab - K), logsumexp - TAIL_FLOOR)
        fill = torch.where(mask, fill, torch.zeros_like(fill))
    else:
        fill = torch.zeros_like(logsumexp)
    out = fill.to(values.dtype).unsqueeze(-1).expand(B, T, vocab).contiguous()
    vals = torch.where(mask.unsqueeze(-1), values, torch.zeros_like(values))
    return out.scatter_(-1, ids.long(), vals)


def cached_head_modules(weights: dict[str, torch.Tensor]) -> tuple[nn.Module | None, nn.Module | None]:
    """Frozen ``nn.Embedding`` / bias-free ``nn.Linear`` from stored teacher weights (None when a
    weight is not stored)."""
    emb = head = None
    if "embed_tokens.weight" in weights:
        emb = nn.Embedding.from_pretrained(weights["embed_tokens.weight"], freeze=True)
    if "lm_head.weight" in weights:
        w = weights["lm_head.weight"]
        head = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        head.weight = nn.Parameter(w, requires_grad=False)
    return emb, head


class TeacherCacheReader:
    """Random access to the examples of a complete cache (memory-mapped, opened lazily per process,
    so DataLoader workers each map the shards themselves).

    Attributes:
        directory, manifest, top_k (K), vocab (V), hidden_size (D), dtype (torch dtype), store.
    """

    def __init__(self, directory: str | os.PathLike, *, flag: str = "--teacher-cache"):
        self.directory = Path(directory)
        self.flag = flag
        self.manifest = m = read_manifest(self.directory, flag=flag)
        what = f"{flag} {self.directory}"
        if not m.get("complete"):
            done = sum(1 for s in m.get("shards", []) if s)
            raise TeacherCacheError(f"{what}: the build is incomplete ({done} of {m.get('n_shards')} "
                                    "shards recorded); rerun its build command to finish it")
        fp = m["fingerprint"]
        self.top_k, self.store = int(fp["top_k"]), list(fp["store"])
        self.vocab, self.hidden_size = int(m["teacher"]["vocab_size"]), int(m["teacher"]["hidden_size"])
        from mckd.models.loading import torch_dtype

        self.dtype = torch_dtype(fp["dtype"])
        self._paths = [self.directory / s["file"] for s in m["shards"]]
        for p, s in zip(self._paths, m["shards"]):
            check_shard_file(p, s["bytes"], what=what)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        self.index: dict[int, tuple[int, int, int]] = {}  # example_index -> (shard, start, stop)
        for i in range(len(self._paths)):
            h = self._handle(i)
            ex, off = h.get_tensor("example_index").tolist(), h.get_tensor("offsets").tolist()
            for j, e in enumerate(ex):
                self.index[int(e)] = (i, off[j], off[j + 1])

    def __getstate__(self):  # DataLoader workers re-open the shards themselves
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _handle(self, i: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if i not in self._handles:
            self._handles[i] = open_shard(self._paths[i], what=f"{self.flag} {self.directory}")
        return self._handles[i]

    def __contains__(self, example_index: int) -> bool:
        return int(example_index) in self.index

    def missing(self, example_indices) -> list[int]:
        """The example indices of ``example_indices`` that the cache does not hold."""
        return [int(e) for e in example_indices if int(e) not in self.index]

    def example(self, example_index: int, *, hidden: bool = True) -> dict[str, torch.Tensor]:
        """The stored rows of one example: ``input_ids`` (n,), ``topk_values``/``topk_ids``
        (n, K), ``logsumexp``/``tail_logmass`` (n,), ``hidden`` (n, D) when asked and stored."""
        if int(example_index) not in self.index:
            raise TeacherCacheError(f"{self.flag} {self.directory}: example {example_index} is not "
                                    "in the cache (was it built with --limit or on another file?)")
        i, a, b = self.index[int(example_index)]
        h = self._handle(i)
        keys = ["input_ids", "topk_values", "topk_ids", "logsumexp", "tail_logmass"]
        if hidden:
            keys.append("hidden")
        try:
            return {k: h.get_slice(k)[a:b] for k in keys}
        except Exception as e:  # noqa: BLE001
            raise TeacherCacheError(f"{self.flag} {self.directory}: cannot read example "
                                    f"{example_index} from shard {self._paths[i]} ({e})") from None

    def collate(self, example_indices, teacher_input_ids, length: int, *,
                hidden: bool) -> dict[str, torch.Tensor]:
        """Padded batch tensors (keys prefixed ``teacher_cache_``) for the rows of one batch.

        Args:
            example_indices: (B,) example indices.
            teacher_input_ids: (B,) lists of the dataset's teacher input ids (checked against the
                cache, so a cache of another tokenization can never be used silently).
            length: T_t, the padded teacher length of the batch.
            hidden: also gather the hidden states.

        Returns:
            ``teacher_cache_topk_values`` (B, T_t, K), ``teacher_cache_topk_ids`` (B, T_t, K)
            int32, ``teacher_cache_logsumexp`` / ``teacher_cache_tail_logmass`` (B, T_t) fp32,
            ``teacher_cache_hidden`` (B, T_t, D) when asked, ``teacher_cache_mask`` (B, T_t) bool.
        """
        B, K = len(example_indices), self.top_k
        out = {"topk_values": torch.zeros(B, length, K, dtype=self.dtype),
               "topk_ids": torch.zeros(B, length, K, dtype=torch.int32),
               "logsumexp": torch.zeros(B, length), "tail_logmass": torch.zeros(B, length)}
        if hidden:
            out["hidden"] = torch.zeros(B, length, self.hidden_size, dtype=self.dtype)
        mask = torch.zeros(B, length, dtype=torch.bool)
        for b, (e, ids) in enumerate(zip(example_indices, teacher_input_ids)):
            rows = self.example(int(e), hidden=hidden)
            n = rows["input_ids"].shape[0]
            if n != len(ids) or not np.array_equal(rows["input_ids"].numpy(), np.asarray(ids)):
                raise TeacherCacheError(
                    f"{self.flag} {self.directory}: example {int(e)}: the cached teacher tokens "
                    f"({n}) differ from the dataset's ({len(ids)}): the cache was built with "
                    "another tokenization of this file")
            for k in out:
                out[k][b, :n] = rows[k]
            mask[b, :n] = True
        batch = {BATCH_PREFIX + k: v for k, v in out.items()}
        batch[MASK_KEY] = mask
        return batch

    def teacher_weights(self) -> dict[str, torch.Tensor]:
        """The stored ``embed_tokens.weight`` / ``lm_head.weight`` (tied heads share the table)."""
        path = self.directory / WEIGHTS_FILE
        stored = [k for k in ("embed_tokens", "lm_head") if k in self.store]
        if not stored:
            return {}
        if not path.is_file():
            raise TeacherCacheError(f"{self.flag} {self.directory}: {WEIGHTS_FILE} is missing "
                                    f"(the manifest lists {stored})")
        from safetensors.torch import load_file

        try:
            w = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise TeacherCacheError(f"{self.flag} {self.directory}: cannot read {path} ({e})") from None
        if "lm_head" in stored and "lm_head.weight" not in w:
            w["lm_head.weight"] = w["embed_tokens.weight"]  # tied head
        return {f"{k}.weight": w[f"{k}.weight"] for k in stored}


class CachedTeacherCollator:
    """Wraps the training collator: the batch it makes, plus the cached teacher tensors of its
    examples (gathered by ``example_index``, padded to the batch's teacher length)."""

    def __init__(self, base, reader: TeacherCacheReader, *, hidden: bool):
        self.base, self.reader, self.hidden = base, reader, hidden

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.base(rows)
        batch.update(self.reader.collate([r["example_index"] for r in rows],
                                         [r["teacher_input_ids"] for r in rows],
                                         batch["teacher_input_ids"].shape[1], hidden=self.hidden))
        return batch


def verify_cache(directory: str | os.PathLike) -> int:
    """Check every shard of a complete cache against the sizes and sha256 of its manifest.
    Returns the number of shards; raises :class:`TeacherCacheError` naming the first bad one."""
    from mckd.teacher_cache.manifest import file_sha256

    reader = TeacherCacheReader(directory, flag="verify")  # sizes and headers
    for p, s in zip(reader._paths, reader.manifest["shards"]):
        if file_sha256(p) != s["sha256"]:
            raise TeacherCacheError(f"verify {directory}: shard {p} does not match its sha256 in the "
                                    "manifest; delete it and rerun the build command to rewrite it")
    return len(reader._paths)

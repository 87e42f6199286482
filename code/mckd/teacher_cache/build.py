"""Run the teacher once over a training file and store what the criteria read.

Steps (:func:`build_cache`):

1. fingerprint the inputs (teacher weight files, tokenizer, data file, lengths, K, dtypes, what
   is stored); an output directory holding another fingerprint is refused, naming each field
   that differs; one with the same fingerprint is resumed;
2. tokenise the file for the teacher exactly as training does (:func:`mckd.data.build_dataset`
   with the teacher tokenizer; rows without a response token are dropped there too);
3. split the rows into shards of ``shard_size`` examples; rank ``r`` of ``W`` (torchrun) writes
   shards ``r, r + W, ...`` that are not on disk yet, each atomically;
4. rank 0 stores the teacher's config and tokenizer (no weights), its embedding table and output
   head once (when asked), and finally the manifest with ``complete: true``, every shard's size
   and sha256.

A killed build leaves whole shards and perhaps a ``.tmp`` file; rerunning the same command skips
the shards on disk (their headers and sizes are checked) and writes the rest.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from mckd import dist
from mckd.teacher_cache.manifest import (CONTENTS, SHARD_DIR, TEACHER_DIR, WEIGHTS_FILE, TeacherCacheError,
                                         differences, file_sha256, make_fingerprint, read_manifest,
                                         weights_fingerprint, write_manifest)
from mckd.teacher_cache.shards import check_shard_file, open_shard, shard_name, write_shard

logger = logging.getLogger(__name__)


def topk_entries(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """What a shard stores of each position's logits.

    Args:
        logits: (N, V) raw teacher logits (any float dtype).
        k: entries kept (1 <= k <= V).

    Returns:
        ``topk_values`` (N, k) in ``logits.dtype``, ``topk_ids`` (N, k) int32, ``logsumexp`` (N,)
        fp32 and ``tail_logmass`` (N,) fp32: log of the softmax mass outside the top k, computed as
        a logsumexp of the remaining logits (no 1 - sum cancellation; -inf when k = V).
    """
    zf = logits.float()
    lse = torch.logsumexp(zf, dim=-1)
    values, ids = torch.topk(logits, k, dim=-1)
    tail = torch.logsumexp(zf.scatter(-1, ids, float("-inf")), dim=-1) - lse
    return {"topk_values": values, "topk_ids": ids.to(torch.int32), "logsumexp": lse,
            "tail_logmass": tail}


def _check_plain_embedding(teacher) -> None:
    """The stored table is used as ``nn.Embedding``: refuse a model whose embedding module does
    more than a table lookup (e.g. scales its output)."""
    from mckd.models import access

    emb = access.get_input_embeddings(teacher)
    probe = torch.arange(min(8, emb.weight.shape[0]), device=emb.weight.device)
    with torch.no_grad():
        if not torch.equal(emb(probe), torch.nn.functional.embedding(probe, emb.weight)):
            raise TeacherCacheError(f"--store embed_tokens: the teacher's {type(emb).__name__} is not "
                                    "a plain table lookup; store without embed_tokens")


def _existing(out: Path, fingerprint: dict, shard_size: int, overwrite: bool) -> dict | None:
    """The manifest of a resumable build in ``out`` (None when starting fresh)."""
    if not (out / "manifest.json").exists():
        return None
    old = read_manifest(out, flag="--output")
    diff = differences(old["fingerprint"], fingerprint)
    if old.get("shard_size") != shard_size:
        diff.append(f"shard_size: cache {old.get('shard_size')}, this run {shard_size}")
    if diff and not overwrite:
        raise TeacherCacheError(f"--output: {out} holds a teacher cache of other inputs ("
                                + "; ".join(diff) + "); use another directory or --overwrite")
    if diff:
        import shutil

        if dist.is_main():
            logger.warning("--overwrite: removing the cache in %s (%s)", out, "; ".join(diff))
            shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
            (out / WEIGHTS_FILE).unlink(missing_ok=True)
        dist.barrier()
        return None
    return old


def _shard_done(path: Path, n_examples: int) -> bool:
    """A shard on disk from an earlier run: complete when its header reads and lists the expected
    examples (shards are renamed into place whole, so a partial file never has the final name)."""
    if not path.is_file():
        return False
    try:
        h = open_shard(path, what="resume")
        return h.get_slice("example_index").get_shape() == [n_examples]
    except TeacherCacheError:
        logger.warning("resume: %s is unreadable; rewriting it", path)
        return False


def _forward_rows(teacher, rows: list[dict], collator, device, *, k: int, dtype: torch.dtype,
                  store_hidden: bool, autocast) -> dict[str, list[torch.Tensor]]:
    """Teacher forward over one batch of rows; per stored key, one (n_i, ...) tensor per example."""
    from mckd.models.loading import model_view
    from mckd.train.engine import model_inputs

    batch = {k_: v.to(device) for k_, v in collator(rows).items()}
    with torch.no_grad(), autocast():
        out = teacher(**model_inputs(teacher, batch), output_hidden_states=store_hidden, use_cache=False)
    view = model_view(teacher, out, with_hidden=store_hidden)
    mask = batch["attention_mask"].bool()
    lens = mask.sum(1).tolist()
    flat = topk_entries(view.logits[mask], k)                                  # (N, ...) real rows
    flat["topk_values"] = flat["topk_values"].to(dtype)
    flat["input_ids"] = batch["input_ids"][mask].to(torch.int32)
    if store_hidden:
        flat["hidden"] = view.hidden[mask].to(dtype)
    return {key: list(v.cpu().split(lens)) for key, v in flat.items()}


def build_cache(*, teacher_model_path: str, output: str, data_file: str, teacher_peft_path: str | None = None,
                max_length: int = 512, max_prompt_length: int = 256, top_k: int = 1024, dtype: str = "bf16",
                teacher_dtype: str | None = None, store: tuple[str, ...] = CONTENTS, batch_size: int = 8,
                shard_size: int = 256, limit: int = -1, overwrite: bool = False,
                device: str | None = None) -> dict:
    """Build (or resume) the teacher cache of ``data_file`` in ``output``. Returns the manifest.

    Args:
        teacher_model_path / teacher_peft_path: the teacher (HF directory, optional LoRA adapter).
        output: cache directory.
        data_file: the training jsonl file (``<data-dir>/train.jsonl``).
        max_length / max_prompt_length: the training run's ``--max-length``/``--max-prompt-length``.
        top_k: K logits kept per position (clipped to the vocabulary size; K = V stores all).
        dtype: storage dtype of logits and hidden states (bf16, fp16, fp32).
        teacher_dtype: dtype the teacher runs in (default: ``dtype``).
        store: subset of ``logits``, ``hidden``, ``embed_tokens``, ``lm_head``.
        batch_size: teacher forward batch. shard_size: examples per shard.
        limit: first N records of the file (-1: all).
        overwrite: replace a cache of other inputs in ``output``.
        device: torch device (default: this rank's GPU, else CPU).
    """
    from mckd.data import DistillCollator, build_dataset
    from mckd.data.dataset import tokenizer_fingerprint
    from mckd.models import loading
    from mckd.models.tokenizers import load_tokenizer
    from mckd.train.engine import _autocast

    unknown = [s for s in store if s not in CONTENTS]
    if unknown or "logits" not in store:
        raise TeacherCacheError(f"--store: {list(store)}: choose from {list(CONTENTS)}; logits are "
                                "always stored")
    if shard_size < 1 or batch_size < 1:
        raise TeacherCacheError(f"--shard-size {shard_size} and --batch-size {batch_size} must be >= 1")
    teacher_dtype = teacher_dtype or dtype
    out, data_file = Path(output), Path(data_file)
    if not data_file.is_file():
        raise TeacherCacheError(f"--data-dir: {data_file} does not exist")
    t0 = time.time()
    tokenizer = load_tokenizer(teacher_model_path, what="teacher")
    config = loading.load_config(teacher_model_path, what="teacher", flag="--teacher-model-path")
    vocab, hidden = int(config.vocab_size), loading.hidden_size(config)
    k = min(int(top_k), vocab)
    if k < 1:
        raise TeacherCacheError(f"--top-k must be >= 1 (got {top_k})")
    # rank 0 hashes the weights (the other ranks would read the same bytes again)
    wfp = dist.broadcast_object(weights_fingerprint(teacher_model_path, teacher_peft_path)
                                if dist.is_main() else None)
    fingerprint = make_fingerprint(
        teacher_weights=wfp, teacher_tokenizer=tokenizer_fingerprint(tokenizer),
        data_file=file_sha256(data_file), max_length=max_length, max_prompt_length=max_prompt_length,
        top_k=k, dtype=dtype, teacher_dtype=teacher_dtype, store=list(store), limit=limit)
    old = _existing(out, fingerprint, shard_size, overwrite)
    if old is not None and old.get("complete"):
        logger.info("%s: the cache is complete; nothing to do", out)
        return old
    dist.barrier()
    # tokenise for the teacher exactly as training does (local rank 0 first fills the arrow cache)
    for turn in (0, 1):
        if (turn == 0) == (dist.local_rank() == 0):
            rows_ds = build_dataset(data_file, student_tokenizer=tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length, limit=limit)
        dist.barrier()
    n_shards = max(1, -(-len(rows_ds) // shard_size))
    manifest = {"fingerprint": fingerprint, "complete": False, "shard_size": shard_size,
                "n_shards": n_shards, "n_examples": len(rows_ds),
                "teacher": {"model_path": str(teacher_model_path), "peft_path": teacher_peft_path,
                            "family": config.model_type, "vocab_size": vocab, "hidden_size": hidden},
                "data_file": str(data_file), "shards": []}
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, manifest)
        tokenizer.save_pretrained(str(out / TEACHER_DIR))
        config.save_pretrained(str(out / TEACHER_DIR))
    dist.barrier()
    todo = [i for i in range(dist.rank(), n_shards, dist.world_size())
            if not _shard_done(out / shard_name(i), len(range(i * shard_size,
                                                                min((i + 1) * shard_size, len(rows_ds)))))]
    need_weights = dist.is_main() and any(s in store for s in ("embed_tokens", "lm_head")) and not (
        out / WEIGHTS_FILE).is_file()
    logger.info("teacher cache %s: %d examples in %d shards; rank %d writes %d (%d already on disk)",
                out, len(rows_ds), n_shards, dist.rank(), len(todo),
                len(range(dist.rank(), n_shards, dist.world_size())) - len(todo))
    n_tokens = 0
    if todo or need_weights:
        dev = torch.device(device) if device else dist.device_for_rank()
        teacher, _, _ = loading.load_teacher(teacher_model_path, dtype=teacher_dtype,
                                             peft_path=teacher_peft_path)
        teacher.to(dev)
        tdt = loading.torch_dtype(dtype)
        if need_weights:
            _store_weights(teacher, out, store, tdt)
        collator = DistillCollator(tokenizer.pad_token_id)
        autocast = (lambda: _autocast(dev, teacher_dtype))
        for i in todo:
            lo, hi = i * shard_size, min((i + 1) * shard_size, len(rows_ds))
            rows = [rows_ds[j] for j in range(lo, hi)]
            parts: dict[str, list[torch.Tensor]] = {}
            for a in range(0, len(rows), batch_size):
                for key, v in _forward_rows(teacher, rows[a:a + batch_size], collator, dev, k=k, dtype=tdt,
                                            store_hidden="hidden" in store, autocast=autocast).items():
                    parts.setdefault(key, []).extend(v)
            lens = torch.tensor([0] + [len(x) for x in parts["input_ids"]])
            tensors = {key: torch.cat(v) for key, v in parts.items()}
            tensors["example_index"] = torch.tensor([int(r["example_index"]) for r in rows], dtype=torch.int64)
            tensors["offsets"] = lens.cumsum(0)
            write_shard(out / shard_name(i), tensors, {"shard": str(i), "top_k": str(k)})
            n_tokens += int(lens.sum())
            logger.info("shard %d/%d: %d examples, %d positions", i + 1, n_shards, hi - lo, int(lens.sum()))
    dist.barrier()
    if dist.is_main():
        shards = []
        for i in range(n_shards):
            p = out / shard_name(i)
            check_shard_file(p, None, what=f"--output {out}")
            h = open_shard(p, what=f"--output {out}")
            shards.append({"file": shard_name(i), "bytes": p.stat().st_size, "sha256": file_sha256(p),
                           "examples": h.get_slice("example_index").get_shape()[0],
                           "positions": h.get_slice("input_ids").get_shape()[0]})
        manifest.update(shards=shards, complete=True, lm_head_tied=_tied(out),
                        build_seconds_last_run=round(time.time() - t0, 3))
        write_manifest(out, manifest)
        for tmp in (out / SHARD_DIR).glob(".*.tmp"):  # left by a killed earlier run
            tmp.unlink(missing_ok=True)
        logger.info("teacher cache %s complete: %d shards, %.1f MB", out, n_shards,
                    sum(s["bytes"] for s in shards) / 1e6)
    dist.barrier()
    return read_manifest(out, flag="--output")


def _tied(out: Path) -> bool:
    if not (out / WEIGHTS_FILE).is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as h:
        return "lm_head.weight" not in h.keys() and "embed_tokens.weight" in h.keys()


def _store_weights(teacher, out: Path, store, dtype: torch.dtype) -> None:
    """The embedding table and output head, once (a tied head is stored as the table only)."""
    from mckd.models import access

    tensors = {}
    emb = access.get_input_embeddings(teacher).weight
    head = access.get_output_head(teacher).weight
    tied = emb.data_ptr() == head.data_ptr()
    if "embed_tokens" in store or ("lm_head" in store and tied):
        _check_plain_embedding(teacher)
        tensors["embed_tokens.weight"] = emb.detach().to("cpu", dtype)
    if "lm_head" in store and not tied:
        tensors["lm_head.weight"] = head.detach().to("cpu", dtype)
    write_shard(out / WEIGHTS_FILE, tensors, {"tied": str(tied)})

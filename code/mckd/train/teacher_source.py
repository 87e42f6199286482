"""Where the teacher's outputs come from: a live teacher forward, or an offline teacher cache.

The loop asks its teacher source for a :class:`mckd.criteria.base.ModelView` per micro-batch; the
criterion reads the same view either way.

* :class:`LiveTeacher` loads the teacher (frozen, eval), places it (ZeRO-3: partitioned for
  inference) and runs it under ``no_grad`` on the batch's ``teacher_*`` inputs.
* :class:`CachedTeacher` (``--teacher-cache DIR``) never loads the teacher's weights. Its config and
  tokenizer come from the cache; at start-up it refuses a stale or foreign cache (naming every
  field that differs from this run), a cache that lacks what the criterion reads (hidden states,
  embedding table, output head) and a training set with examples the cache does not hold. The
  collator attaches each batch's cached tensors (read by memory mapping, see
  :mod:`mckd.teacher_cache.shards`); :meth:`CachedTeacher.view` removes them from the batch and
  rebuilds the full-vocabulary logits on the device.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from mckd import dist
from mckd.models.view import ModelView
from mckd.data.batch import TEACHER_PREFIX
from mckd.models import loading

logger = logging.getLogger(__name__)


class LiveTeacher:
    """The teacher model itself (or no teacher: ``model`` and ``tokenizer`` None)."""

    def __init__(self, model=None, tokenizer=None, config_path: str | None = None):
        self.model, self.tokenizer, self.config_path = model, tokenizer, config_path

    def check_criterion(self, criterion) -> None:
        """Nothing to check: a live teacher has every output."""

    def wrap_collator(self, collator, train_set):
        return collator

    def place(self, device: torch.device, ds_cfg: dict | None, zero3: bool):
        """Move the teacher to ``device`` (ZeRO-3: DeepSpeed inference engine, partitioned), eval
        mode. Returns the model the loop calls."""
        if self.model is None:
            return None
        if ds_cfg is not None and zero3:
            import deepspeed

            inf_cfg = {k: v for k, v in ds_cfg.items() if k not in ("optimizer", "scheduler")}
            self.model = deepspeed.initialize(model=self.model, config=inf_cfg,
                                              dist_init_required=False)[0].module
        else:
            self.model.to(device)
        self.model.eval()
        return self.model

    def view(self, batch: dict, need_hidden: bool, autocast) -> ModelView | None:
        if self.model is None:
            return None
        from mckd.train.engine import model_inputs

        with torch.no_grad(), autocast():
            out = self.model(**model_inputs(self.model, batch, TEACHER_PREFIX),
                             output_hidden_states=need_hidden, use_cache=False)
        return loading.model_view(self.model, out, with_hidden=need_hidden)


class _Missing(torch.nn.Module):
    """Stands in for a teacher module the cache does not hold; using it names what is missing."""

    weight = None

    def __init__(self, what: str, directory: Path):
        super().__init__()
        self.what, self.directory = what, directory

    def forward(self, *args, **kwargs):
        from mckd.teacher_cache.manifest import TeacherCacheError

        raise TeacherCacheError(f"--teacher-cache {self.directory}: the criterion called the teacher's "
                                f"{self.what}, which the cache does not hold (build with --store ...,"
                                f"{self.what})")


class CachedTeacher:
    """Teacher outputs from a cache directory (see the module docstring)."""

    model = None

    def __init__(self, directory: str, *, data_file: str, max_length: int, max_prompt_length: int,
                 teacher_model_path: str | None = None, teacher_peft_path: str | None = None):
        from mckd.models.tokenizers import TokenizerLoadError, load_tokenizer
        from mckd.teacher_cache.manifest import (TEACHER_DIR, TRAINING_FIELDS, TeacherCacheError, differences,
                                                 file_sha256, weights_fingerprint)
        from mckd.teacher_cache.shards import TeacherCacheReader

        self.directory = Path(directory)
        self.reader = TeacherCacheReader(directory)
        fp = self.reader.manifest["fingerprint"]
        self.config_path = str(self.directory / TEACHER_DIR)
        try:
            self.tokenizer = load_tokenizer(self.config_path, what="teacher (from the cache)")
        except TokenizerLoadError as e:
            raise TeacherCacheError(f"--teacher-cache: {e}") from None
        from mckd.data.dataset import PIPELINE_VERSION, tokenizer_fingerprint
        from mckd.teacher_cache.manifest import FORMAT_VERSION

        wanted = {"format_version": FORMAT_VERSION, "pipeline_version": PIPELINE_VERSION,
                  "teacher_tokenizer": tokenizer_fingerprint(self.tokenizer),
                  "max_length": int(max_length), "max_prompt_length": int(max_prompt_length)}
        if dist.is_main():  # hashing reads every byte: rank 0 only
            wanted["data_file"] = file_sha256(data_file)
            if teacher_model_path is not None:
                wanted["teacher_weights"] = weights_fingerprint(teacher_model_path, teacher_peft_path)
                wanted["teacher_tokenizer"] = tokenizer_fingerprint(
                    load_tokenizer(teacher_model_path, what="teacher"))
        wanted.update(dist.broadcast_object({k: wanted.get(k) for k in ("data_file", "teacher_weights",
                                                                          "teacher_tokenizer")}))
        wanted = {k: v for k, v in wanted.items() if v is not None}
        diff = differences(fp, wanted, TRAINING_FIELDS)
        if diff:
            what = {"data_file": f"--data-dir ({data_file})", "teacher_weights": "--teacher-model-path",
                    "teacher_tokenizer": "the teacher tokenizer", "max_length": "--max-length",
                    "max_prompt_length": "--max-prompt-length"}
            raise TeacherCacheError(
                f"--teacher-cache {directory}: stale or foreign cache, built from other inputs than this "
                "run: " + "; ".join(f"{d} [{what.get(d.split(':')[0], d.split(':')[0])}]" for d in diff)
                + ". Rebuild it with python -m mckd.teacher_cache build (see docs/teacher_cache.md)")
        self.store, self.vocab = self.reader.store, self.reader.vocab
        self.embed_tokens = self.lm_head = None
        self.need_hidden = True

    def check_criterion(self, criterion) -> None:
        """Fail at start-up when the criterion reads something the cache does not hold."""
        from mckd.teacher_cache.manifest import TeacherCacheError

        name = getattr(criterion, "registry_name", type(criterion).__name__)
        needs = (["hidden"] if criterion.needs_hidden else []) + list(getattr(criterion, "teacher_modules", ()))
        missing = [n for n in needs if n not in self.store]
        if missing:
            raise TeacherCacheError(
                f"--teacher-cache {self.directory}: criterion {name} reads the teacher's "
                f"{', '.join(missing)}, which this cache does not hold (it stores {', '.join(self.store)}); "
                f"rebuild it with --store {','.join(dict.fromkeys(self.store + missing))}")
        ranks, k = getattr(criterion, "teacher_ranks", None), self.reader.top_k
        if ranks is not None and min(ranks, self.vocab) > k:
            raise TeacherCacheError(
                f"--teacher-cache {self.directory}: criterion {name} reads the teacher's top {ranks} logits "
                f"rank by rank, this cache stores {k}; rebuild it with --top-k {ranks} or more")
        self.need_hidden = criterion.needs_hidden
        if k < self.vocab:
            logger.warning("teacher cache: top-%d of %d logits per position; the other %d ids share the stored "
                           "tail mass uniformly (terms over the whole distribution are approximate, more so "
                           "at temperatures > 1: docs/teacher_cache.md)", k, self.vocab, self.vocab - k)

    def wrap_collator(self, collator, train_set):
        """The training collator plus the cached tensors; every training example must be cached."""
        from mckd.teacher_cache.manifest import TeacherCacheError
        from mckd.teacher_cache.shards import CachedTeacherCollator

        missing = self.reader.missing(train_set.hf["example_index"])
        if missing:
            raise TeacherCacheError(
                f"--teacher-cache {self.directory}: {len(missing)} of {len(train_set)} training examples "
                f"are not in the cache (first: example {missing[0]}); it was built with --limit "
                f"{self.reader.manifest['fingerprint']['limit']}")
        return CachedTeacherCollator(collator, self.reader, hidden=self.need_hidden)

    def place(self, device: torch.device, ds_cfg: dict | None, zero3: bool):
        """Load the stored embedding table / head onto ``device`` (the teacher itself never loads)."""
        from mckd.teacher_cache.shards import cached_head_modules

        w = {k: v.to(device) for k, v in self.reader.teacher_weights().items()}
        emb, head = cached_head_modules(w)
        self.embed_tokens = emb if emb is not None else _Missing("embed_tokens", self.directory)
        self.lm_head = head if head is not None else _Missing("lm_head", self.directory)
        self.device = device
        return None

    def view(self, batch: dict, need_hidden: bool, autocast) -> ModelView:
        """Remove the ``teacher_cache_*`` tensors from ``batch`` and build the teacher's view."""
        from mckd.teacher_cache.shards import BATCH_PREFIX, dense_logits

        c = {k[len(BATCH_PREFIX):]: batch.pop(k) for k in [k for k in batch if k.startswith(BATCH_PREFIX)]}
        logits = dense_logits(c["topk_values"], c["topk_ids"], c["logsumexp"], c["tail_logmass"], c["mask"],
                              self.vocab)
        hidden = c.get("hidden") if need_hidden else None
        return ModelView(logits=logits, hidden=hidden, embed_tokens=self.embed_tokens, lm_head=self.lm_head)


def load_teacher_source(cfg, crit_cls):
    """The run's teacher source: none (SFT), the cache (``--teacher-cache``) or the live teacher."""
    m, p = cfg.model, cfg.peft
    if not crit_cls.needs_teacher:
        if m.teacher_model_path is not None or getattr(m, "teacher_cache", None) is not None:
            logger.warning("criterion %s uses no teacher: --teacher-model-path / --teacher-cache are "
                           "ignored", m.criterion)
        return LiveTeacher()
    if getattr(m, "teacher_cache", None) is not None:
        logger.info("teacher outputs from the cache %s (the teacher's weights are not loaded)", m.teacher_cache)
        return CachedTeacher(m.teacher_cache, data_file=str(Path(cfg.data.data_dir) / "train.jsonl"),
                             max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                             teacher_model_path=m.teacher_model_path, teacher_peft_path=p.teacher_peft_path)
    model, tokenizer, _ = loading.load_teacher(m.teacher_model_path, dtype=cfg.derived["teacher_load_dtype"],
                                               declared_type=m.teacher_model_type, peft_path=p.teacher_peft_path)
    return LiveTeacher(model, tokenizer, m.teacher_model_path)

"""Offline teacher cache: run the teacher once over the training set, distil from its stored outputs.

* :mod:`.build` runs the teacher and writes sharded safetensors files (``python -m
  mckd.teacher_cache build``; torchrun splits the shards over ranks; an interrupted build resumes).
* :mod:`.manifest` fingerprints what the stored tensors depend on and refuses stale or foreign
  caches, naming each field that differs.
* :mod:`.shards` holds the format, the memory-mapped reader, the collator that attaches the cached
  tensors of each batch's examples, and the reconstruction of the full-vocabulary logits.

Training reads a cache with ``--teacher-cache DIR`` (:mod:`mckd.train.teacher_source`); the
criterion sees the same ``ModelView`` as with a live teacher. See docs/teacher_cache.md.
"""

"""On-policy batches: the student's own samples replace a batch's responses (GKD's lambda).

With probability ``--on-policy-ratio`` a micro-batch's dataset responses are replaced by the
student's sampled continuations of the same prompts. One on-policy micro-batch is made in four
stages (:meth:`OnPolicyBatches.make_batch`):

1. **prompts**: the student's tokenisation of each prompt is read off the cached batch (the input
   tokens up to the first label position), so the student continues exactly the prompt it would
   have been trained on;
2. **generation**: batched sampling with left padding and the KV cache
   (:func:`mckd.evaluation.generate.generate_one_batch`) at ``--on-policy-temperature`` (top-k and
   top-p off, no n-gram blocking: the student's own distribution), up to
   ``--on-policy-max-new-tokens`` tokens or the student's eos. Under ZeRO-3 every rank generates in
   lock step (``synced_gpus``), which gathers the partitioned parameters layer by layer;
3. **re-tokenisation and alignment**: each sample is decoded to text and the batch is rebuilt from
   (prompt text, sample text) by :func:`mckd.data.build_batch`, the per-example code of the cached
   data path: both tokenisations, offsets and every alignment feature the criterion asks for
   (MinED's index, MCW-KD's DTW pairs); the teacher then runs on its own tokenisation;
4. **labels**: the labels cover the sampled tokens, and the eos only when the student generated
   it: a sample cut at the token limit has no eos label on either side (and no MinED index there).
   The batch carries ``on_policy`` (a 0-dim true tensor): every criterion drops its CE term on
   such a batch (GKD: the student's own sample is no reference to imitate; what it learns there
   is the teacher's distribution on its tokens), so an on-policy batch trains the KD terms only.
   Measured on the embedded default before this rule, with CE on the student's own samples
   (MCW-KD, kd_rate 0, ratio 0.5, 5 seeds): best dev loss 2.67-3.25 against 2.18 off-policy, and
   one seed stuck at 5.28 after 3 epochs: the student imitated its own early, wrong samples.

The student side is the canonical tokenisation of the decoded sample. It equals the sampled ids
unless the sampler produced a split that the tokenizer would not (or a special token, which
decoding drops); the fraction of such rows is logged as ``stat/on_policy_retokenized``.

Determinism: the coin of micro-batch ``i`` of optimizer step ``s`` is drawn from a generator seeded
by ``(seed, s, i)``, the same on every rank (ZeRO-3 ranks must generate together), and its samples
from one seeded by ``(seed, s, i, rank)`` inside a forked RNG. Nothing reads or advances the global
RNG, so a resumed run draws the same coins and samples, and ``--on-policy-ratio 0`` (no object is
built) leaves a run exactly as it was.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mckd.data import alignment as al
from mckd.data.batch import IGNORE_INDEX, teacher_key

logger = logging.getLogger(__name__)

_COIN, _SAMPLE = 0, 1  # streams of the seed sequence


def _stream_seed(*key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(k) % 2 ** 64 for k in key])


def prompt_ids(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The student's prompt tokens of each row of a collated batch.

    The first label position ``p`` is the last prompt token (it predicts the first response token),
    so the prompt is ``input_ids[b, :p + 1]``.

    Args:
        batch: a collated batch (``input_ids``, ``labels`` (B, T_s)); every row has a label.
    """
    has = (batch["labels"] != IGNORE_INDEX)
    if not bool(has.any(1).all()):
        raise ValueError("on-policy: a batch row has no label token, so its prompt end is unknown")
    ends = (has.int().argmax(1) + 1).tolist()                                     # (B,)
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), ends)]


def drop_unfinished_eos(batch: dict[str, torch.Tensor], unfinished: torch.Tensor, *,
                        student_eos: int, teacher_eos: int | None) -> dict[str, torch.Tensor]:
    """Mask the eos label of samples the student did not finish.

    :func:`mckd.data.build_batch` appends an eos to every response, as the dataset path does; a
    sample cut at the token limit never generated one. Its last label is set to -100 on each side
    when that label is the eos (it is not when ``max_length`` cut the sequence earlier), and
    MinED's index is cleared there.

    Args:
        batch: the output of ``build_batch`` (not modified; changed tensors are copies).
        unfinished: (B,) bool, True where the sample reached the token limit without eos.
        student_eos / teacher_eos: eos ids of the two tokenizers (``None``: no teacher side).

    Returns:
        The batch with the masked labels.
    """
    out = dict(batch)
    sides = [("", student_eos)] + ([(teacher_key(""), teacher_eos)] if teacher_eos is not None else [])
    for pre, eos in sides:
        labels = batch[pre + "labels"]
        T = labels.shape[1]
        has = labels != IGNORE_INDEX
        last = T - 1 - has.flip(1).int().argmax(1)                                # (B,) last label
        is_eos = labels.gather(1, last[:, None]).squeeze(1) == eos
        drop = unfinished.to(labels.device) & is_eos & has.any(1)                 # (B,)
        hit = drop[:, None] & (torch.arange(T, device=labels.device)[None, :] == last[:, None])
        out[pre + "labels"] = labels.masked_fill(hit, IGNORE_INDEX)
        if pre == "" and "mined_teacher_index" in batch:
            out["mined_teacher_index"] = batch["mined_teacher_index"].masked_fill(hit, -1)
    return out


class OnPolicyBatches:
    """Replaces micro-batches by on-policy ones with probability ``ratio``.

    Args:
        ratio: probability that a micro-batch is on-policy (0 < ratio <= 1).
        temperature: sampling temperature.
        max_new_tokens: most tokens sampled per response.
        seed: the run's seed.
        prompts: prompt text of every training example, indexed by ``example_index``.
        student_tokenizer / teacher_tokenizer: as for :func:`mckd.data.build_batch`.
        alignment: the criterion's alignment features (``Criterion.alignment``).
        max_length / max_prompt_length: the run's ``--max-length`` / ``--max-prompt-length``.
        rank: this process's rank (samples differ across ranks, coins do not).
        synced_gpus: ZeRO-3: generate in lock step with the other ranks.
        autocast: a callable returning the engine's autocast context for generation.
    """

    def __init__(self, *, ratio: float, temperature: float, max_new_tokens: int, seed: int,
                 prompts: list[str], student_tokenizer, teacher_tokenizer, alignment=(),
                 max_length: int, max_prompt_length: int, rank: int = 0, synced_gpus: bool = False,
                 autocast: Callable | None = None):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"--on-policy-ratio must be in (0, 1] here, got {ratio}")
        if temperature <= 0 or max_new_tokens < 1:
            raise ValueError(f"--on-policy-temperature ({temperature}) and "
                             f"--on-policy-max-new-tokens ({max_new_tokens}) must be positive")
        if teacher_tokenizer is None:
            raise ValueError("on-policy batches need a teacher tokenizer (a criterion with a teacher)")
        from mckd.evaluation.generate import generation_kwargs

        self.ratio, self.seed, self.rank = float(ratio), int(seed), int(rank)
        self.max_new_tokens = int(max_new_tokens)
        self.prompts = list(prompts)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.alignment = al.check_alignment_names(alignment)
        self.max_length, self.max_prompt_length = int(max_length), int(max_prompt_length)
        self.markers = al.feature_markers(student_tokenizer, teacher_tokenizer, self.alignment)
        self.autocast = autocast
        tok = student_tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.gen_kwargs = generation_kwargs(
            max_new_tokens=self.max_new_tokens, do_sample=True, top_p=1.0, top_k=0,
            temperature=float(temperature), no_repeat_ngram_size=0, eos_token_id=tok.eos_token_id,
            pad_token_id=self.pad_id)
        if synced_gpus:
            self.gen_kwargs["synced_gpus"] = True

    @classmethod
    def from_config(cls, cfg, *, student_tokenizer, teacher_tokenizer, alignment, rank: int,
                    synced_gpus: bool, autocast) -> "OnPolicyBatches | None":
        """The run's on-policy batch maker, or None when ``--on-policy-ratio`` is 0."""
        t, d = cfg.train, cfg.data
        if t.on_policy_ratio <= 0:
            return None
        from mckd.data.examples import read_examples

        prompts = [e.prompt for e in read_examples(Path(d.data_dir) / "train.jsonl", limit=d.train_num)]
        logger.info("on-policy: ratio %.3g, temperature %.3g, up to %d new tokens", t.on_policy_ratio,
                    t.on_policy_temperature, cfg.derived["on_policy_max_new_tokens"])
        return cls(ratio=t.on_policy_ratio, temperature=t.on_policy_temperature,
                   max_new_tokens=cfg.derived["on_policy_max_new_tokens"], seed=t.seed, prompts=prompts,
                   student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
                   alignment=alignment, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                   rank=rank, synced_gpus=synced_gpus, autocast=autocast)

    # ------------------------------------------------------------------ randomness
    def is_on_policy(self, step: int, micro: int) -> bool:
        """The coin of micro-batch ``micro`` of optimizer step ``step`` (identical on every rank)."""
        rng = np.random.default_rng(_stream_seed(_COIN, self.seed, step, micro))
        return bool(rng.random() < self.ratio)

    def sample_seed(self, step: int, micro: int) -> int:
        """Torch seed of this rank's samples for one micro-batch."""
        state = _stream_seed(_SAMPLE, self.seed, step, micro, self.rank).generate_state(1, np.uint64)
        return int(state[0]) % (2 ** 63 - 1)

    # ------------------------------------------------------------------ one batch
    def sample(self, model, batch: dict[str, torch.Tensor], seed: int
               ) -> tuple[list[list[int]], list[bool]]:
        """Sampled response ids (eos excluded) and whether each row generated its eos."""
        from mckd.evaluation.generate import generate_one_batch, generating_model

        net = generating_model(model)
        was_training = net.training
        net.eval()
        try:
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
                ids = generate_one_batch(net, prompt_ids(batch), pad_id=self.pad_id,
                                         stop_ids=[self.student_tokenizer.eos_token_id],
                                         gen_kwargs=self.gen_kwargs, seed=seed)
        finally:
            net.train(was_training)
        # a row shorter than the limit stopped at its eos (rows finished early are padded after it)
        return ids, [len(x) < self.max_new_tokens for x in ids]

    def build(self, batch: dict[str, torch.Tensor], responses: list[list[int]],
              finished: list[bool]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The on-policy batch of sampled ``responses`` to the prompts of ``batch``.

        Returns:
            (batch with the keys of the cached path's batch, stats: ``retokenized`` fraction of rows
            whose student tokens differ from the sampled ids, ``finished`` fraction with eos)
        """
        from mckd.data import build_batch

        index = batch["example_index"].tolist()
        texts = self.student_tokenizer.batch_decode(responses, skip_special_tokens=True)
        out = build_batch([self.prompts[i] for i in index], texts,
                          student_tokenizer=self.student_tokenizer,
                          teacher_tokenizer=self.teacher_tokenizer, alignment=self.alignment,
                          max_length=self.max_length, max_prompt_length=self.max_prompt_length,
                          example_index=index, markers=self.markers)
        if prompt_ids(out) != prompt_ids(batch):
            raise RuntimeError("on-policy: the prompt texts do not tokenise to the training "
                               "batch's prompts (was the data file changed during the run?)")
        # an unfinished sample that decodes to nothing (special tokens only) keeps its eos label
        done = torch.tensor([f or not x for f, x in zip(finished, texts)], dtype=torch.bool)
        out = drop_unfinished_eos(out, ~done, student_eos=self.student_tokenizer.eos_token_id,
                                  teacher_eos=self.teacher_tokenizer.eos_token_id)
        eos = self.student_tokenizer.eos_token_id
        cut = (out["attention_mask"].sum(1) >= self.max_length - 1).tolist()  # max_length truncated
        changed = 0
        for labels, resp, fin, c in zip(out["labels"].tolist(), responses, done.tolist(), cut):
            got = [t for t in labels if t != IGNORE_INDEX]
            want = list(resp) + [eos] * fin
            changed += int(got != (want[: len(got)] if c else want))
        return out, {"retokenized": changed / len(responses),
                     "finished": float(done.float().mean())}

    def make_batch(self, model, batch: dict[str, torch.Tensor], seed: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Sample, re-tokenise and align one micro-batch (see the module docstring)."""
        responses, finished = self.sample(model, batch, seed)
        return self.build(batch, responses, finished)

    # ------------------------------------------------------------------ the loop's call
    def replace(self, micro: list[dict], step: int, model, acc: dict, device) -> list[dict]:
        """The optimizer step's micro-batches, each replaced by an on-policy one when its coin says
        so. Adds ``stat/on_policy``, ``stat/on_policy_finished`` and ``stat/on_policy_retokenized``
        (per micro-batch, 0 for off-policy ones; the loop averages ``stat/`` keys over
        micro-batches) to the loop's metric accumulator ``acc``."""
        out = []
        for i, batch in enumerate(micro):
            stats = {"on_policy": 0.0, "on_policy_finished": 0.0, "on_policy_retokenized": 0.0}
            if self.is_on_policy(step, i):
                batch, s = self.make_batch(model, batch, self.sample_seed(step, i))
                batch["on_policy"] = torch.ones((), dtype=torch.bool)   # criteria drop their CE here
                stats.update(on_policy=1.0, on_policy_finished=s["finished"],
                             on_policy_retokenized=s["retokenized"])
            for k, v in stats.items():
                v = torch.tensor(v, dtype=torch.float32, device=device)
                acc[f"stat/{k}"] = acc[f"stat/{k}"] + v if f"stat/{k}" in acc else v
            out.append(batch)
        return out


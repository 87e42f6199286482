"""The training recipe: setup, train, save, cleanup (one loop for plain torch, DDP and DeepSpeed).

Per optimizer step:

1. draw ``gas`` micro-batches (with ``--on-policy-ratio``, some are replaced by the student's own
   samples: :mod:`mckd.train.on_policy`); count their label tokens and all-reduce the count once
   (``T``);
2. ``criterion.set_progress(step, total_steps)``;
3. per micro-batch: the teacher's view (a live forward, ``no_grad``, eval, or the offline teacher
   cache: :mod:`mckd.train.teacher_source`), student forward + criterion inside the
   wrapped module, ``loss = loss_sum * engine.loss_scale(T)``, backward (DDP reduces on the last
   micro-batch only);
4. clip + optimizer + scheduler step (skipped when the gradient is not finite), then
   ``criterion.after_optimizer_step(all_reduce_mean)``;
5. metrics stay on the device and are reduced once per ``--log-interval``.

Evaluation and checkpoints happen every ``--eval-interval`` / ``--save-interval`` epochs or steps
(``--interval-unit``), and once more at the end of the run.

Guarantees (docs/training.md): the run directory is locked for this process before anything is
written (:mod:`mckd.train.rundir`); a diverging loss, non-finite dev metrics or non-finite weights
stop the run without writing a checkpoint (:mod:`mckd.train.guards`); Ctrl-C / SIGTERM save a
resumable state after the current step; ``run_state.json`` records how the run ended.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from mckd import dist
from mckd.config import (Config, ConfigError, finalize, load_deepspeed_json, resume_changes,
                         write_args_json)
from mckd.criteria.base import CriterionResources, get_criterion_class
from mckd.criteria.options import KDOptions
from mckd.data.batch import IGNORE_INDEX
from mckd.models import loading
from mckd.train import checkpoint as ckpt_io
from mckd.train import dev_eval, optim, rundir, teacher_source
from mckd.train.guards import (StepDivergence, StopSignals, TrainingAborted, TrainingDiverged,
                               TrainingInterrupted, all_finite, non_finite_metrics)
from mckd.train.console import Progress
from mckd.train.engine import DeepSpeedEngine, DistillModule, TorchEngine, fill_deepspeed_config
from mckd.train.on_policy import OnPolicyBatches
from mckd.train.sampling import ResumableDistributedSampler

logger = logging.getLogger("mckd.train")


__all__ = ["Trainer", "TrainingAborted", "TrainingDiverged", "TrainingInterrupted", "run"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _setup_file_logging(save_dir: Path) -> None:
    if not dist.is_main():
        return
    root = logging.getLogger("mckd")
    path = str(save_dir / "train.log")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path)
           for h in root.handlers):
        return
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


def _close_file_logging(save_dir: Path) -> None:
    """Detach the run's train.log handler (a later run in this process may use another directory,
    or this one after it was moved aside)."""
    root = logging.getLogger("mckd")
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)
              and h.baseFilename == os.path.abspath(save_dir / "train.log")]:
        root.removeHandler(h)
        h.close()


class Trainer:
    """Build everything from a :class:`Config`, then :meth:`train`."""

    on_policy: OnPolicyBatches | None = None  # set by setup when --on-policy-ratio > 0

    def __init__(self, cfg: Config):
        self.cfg = cfg

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        cfg, t, m = self.cfg, self.cfg.train, self.cfg.model
        dist.init_distributed(cfg.dist.ddp_backend, deepspeed=cfg.dist.deepspeed)
        self.device = dist.device_for_rank()
        self.rank, self.world = dist.rank(), dist.world_size()
        cfg.derived.update(world_size=self.world, rank=self.rank,
                           effective_batch_size=t.batch_size * t.gradient_accumulation_steps * self.world)
        self.save_dir = Path(t.save_dir)
        # Rank 0 takes the directory (lock) before anything is written; the others learn the outcome.
        self.run_dir, error = None, None
        if dist.is_main():
            try:
                self.run_dir = rundir.prepare_run_dir(t.save_dir, overwrite=t.overwrite, resume=t.resume)
            except rundir.RunDirError as e:
                error = str(e)
        error = dist.all_gather_object(error)[0]
        if error:
            raise rundir.RunDirError(error)
        try:
            self._setup()
        except BaseException:
            if self.run_dir is not None and not self.committed:
                self.run_dir.abandon()
            raise
        return self

    def _setup(self) -> None:
        cfg, t, m = self.cfg, self.cfg.train, self.cfg.model
        self.committed = False
        self.resume_from = ckpt_io.latest_checkpoint(self.save_dir) if t.resume else None
        if t.resume and self.resume_from is None:
            logger.info("--resume: no complete checkpoint in %s; starting from scratch", self.save_dir)
        if self.resume_from is not None:
            self._check_resume_args()
        _seed_everything(t.seed + self.rank)
        if self.device.type == "cpu":
            # Denormal floats make some CPU kernels ~20x slower (measured in BENCHMARKS.md);
            # flushing them to zero changes nothing a training run can see.
            torch.set_flush_denormal(True)

        self.crit_cls = get_criterion_class(m.criterion)
        ds_cfg = None
        if cfg.dist.deepspeed:
            ds_cfg = fill_deepspeed_config(
                load_deepspeed_json(cfg.dist.deepspeed_config), batch_size=t.batch_size,
                grad_acc=t.gradient_accumulation_steps, world_size=self.world,
                clip_grad=t.clip_grad, precision=t.precision)
            if int(ds_cfg["zero_optimization"].get("stage", 0)) == 3:
                from transformers.integrations import HfDeepSpeedConfig

                self._hf_ds = HfDeepSpeedConfig(ds_cfg)  # must stay alive: partitioned loading
        self.ds_cfg = ds_cfg
        self._load_models()
        self._build_data()
        finalize(cfg, len(self.train_set))
        self.total_steps = cfg.derived["total_steps"]
        self.run_steps = cfg.derived["run_steps"]
        self.ipe = cfg.derived["iters_per_epoch"]
        if self.resume_from is not None:
            saved = json.loads((self.resume_from / ckpt_io.STATE_JSON).read_text())
            if saved.get("data_layout") not in (None, self._data_layout()):
                raise ConfigError(f"--resume: {self.resume_from} was written with data layout "
                                  f"{saved['data_layout']} (world size, batch size, accumulation, "
                                  f"training examples) but this run has {self._data_layout()}; "
                                  "the data position cannot be carried over")
        self._build_engine()
        self.on_policy = OnPolicyBatches.from_config(  # None unless --on-policy-ratio > 0
            cfg, student_tokenizer=self.tokenizer, teacher_tokenizer=self.teacher_tokenizer,
            alignment=self.criterion.alignment, rank=self.rank, autocast=self.engine.autocast,
            synced_gpus=self.engine.kind == "deepspeed" and self.engine.zero_stage == 3)
        # best_dev_loss / evals_without_improvement: early stopping (--early-stop-patience)
        self.state = {"global_step": 0, "epoch": 0, "consumed": 0, "nan_streak": 0,
                      "best_dev_loss": None, "evals_without_improvement": 0}
        if self.resume_from is not None:  # read (and check) before anything is written
            saved = ckpt_io.load_resume_state(self.resume_from, engine=self.engine,
                                              criterion=self.criterion)
            self.state.update(saved["loop"])
        # Nothing failed: from here on the run directory is written.
        if dist.is_main():
            self.run_dir.commit()  # --overwrite: the old run is moved aside only now
            if t.resume and self.resume_from is None:
                self._clear_previous_attempt()
            write_args_json(cfg, self.save_dir / ("args.json" if self.resume_from is None
                                                  else "args.resume.json"))
            ckpt_io.write_run_state(self.save_dir, "running", step=self.state["global_step"])
        self.committed = True
        dist.barrier()
        _setup_file_logging(self.save_dir)
        if self.resume_from is not None:
            logger.info("resumed from %s at step %d", self.resume_from, self.state["global_step"])
        # on-policy steps train the KD terms only (no CE): their loss has its own scale and monitor
        self.divergence = StepDivergence(t.divergence_threshold, t.divergence_patience, self.state,
                                         on_policy=self.on_policy is not None)
        self._step_kind = "off"
        self._open_writers()

    def _check_resume_args(self) -> None:
        """A resumed run keeps its hyper-parameters: refuse changed ones, apply and report the
        harmless ones (:data:`mckd.config.RESUME_MAY_CHANGE`)."""
        path = self.save_dir / "args.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            logger.warning("--resume: %s is missing or unreadable; the settings cannot be compared", path)
            return
        refused, applied = resume_changes(saved, self.cfg)
        if refused:
            raise ConfigError(f"--resume: {', '.join(refused)} differ from the run's {path}; a resumed "
                              "run keeps its settings (pass the original values, or start a new run "
                              "with --overwrite)")
        if applied:
            logger.warning("--resume: applying changed settings: %s", ", ".join(applied))
        self.cfg.derived["resume_changes"] = applied
        self.cfg.derived["resumed_from"] = str(self.resume_from)

    def _clear_previous_attempt(self) -> None:
        """--resume without a checkpoint starts from scratch: the logs of the attempt that never
        reached a checkpoint go."""
        import shutil

        (self.save_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(self.save_dir / "tensorboard", ignore_errors=True)

    def _load_models(self) -> None:
        cfg, m, p = self.cfg, self.cfg.model, self.cfg.peft
        student_path, peft_path = m.model_path, p.peft_path
        if self.resume_from is not None:  # weights come from the checkpoint
            if p.peft == "lora":
                peft_path = str(self.resume_from)
            elif not cfg.dist.deepspeed:
                student_path = str(self.resume_from)
        targets = p.peft_target_modules.split(",") if p.peft_target_modules else None
        self.student, self.tokenizer, self.family = loading.load_student(
            student_path, dtype=cfg.derived["student_load_dtype"],
            gradient_checkpointing=m.gradient_checkpointing, declared_type=m.model_type,
            peft=p.peft, lora_r=p.peft_lora_r, lora_alpha=p.peft_lora_alpha,
            lora_dropout=p.peft_lora_dropout, lora_target_modules=targets, peft_path=peft_path)
        self.teacher_source = teacher_source.load_teacher_source(cfg, self.crit_cls)
        self.teacher, self.teacher_tokenizer = self.teacher_source.model, self.teacher_source.tokenizer
        if self.teacher_tokenizer is not None and not self.crit_cls.cross_tokenizer:
            from mckd.models.tokenizers import vocabulary_difference

            where = m.teacher_model_path or m.teacher_cache
            dims_ = loading.read_dims(m.model_path, self.teacher_source.config_path)
            if dims_.student_vocab != dims_.teacher_vocab:
                raise ConfigError(f"--teacher-model-path: criterion {m.criterion!r} needs the teacher "
                                  f"and student to share one vocabulary, but their vocabulary sizes "
                                  f"differ ({dims_.teacher_vocab} vs {dims_.student_vocab}); use a "
                                  "cross-tokenizer criterion")
            diff = vocabulary_difference(self.tokenizer, self.teacher_tokenizer)
            if diff is not None:
                raise ConfigError(f"--teacher-model-path: criterion {m.criterion!r} needs the teacher "
                                  f"and student to share one vocabulary, but the tokenizers of "
                                  f"{where} and {m.model_path} differ: {diff}")
        dims = loading.read_dims(m.model_path, self.teacher_source.config_path)
        resources = CriterionResources(student_tokenizer=self.tokenizer,
                                       teacher_tokenizer=self.teacher_tokenizer,
                                       projector_pretraining=self.cfg.train.only_save_projector,
                                       student_model=self.student, teacher_model=self.teacher)
        self.criterion = self.crit_cls.from_options(self.cfg.criterion_options, dims, resources)
        self.teacher_source.check_criterion(self.criterion)
        self.cfg.derived["model_dims"] = vars(dims)
        self.cfg.derived["student_family"] = self.family

    def _build_data(self) -> None:
        from mckd.data import DistillCollator, build_dataset, build_prompt_dataset

        d, e = self.cfg.data, self.cfg.eval
        align = tuple(self.criterion.alignment)  # the instance knows what its options need
        kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length)
        # Local rank 0 of every node tokenises and caches first (node-local or shared cache
        # directories both work); the other ranks then read the cache.
        for turn in (0, 1):
            if (turn == 0) == (dist.local_rank() == 0):
                self.train_set = build_dataset(Path(d.data_dir) / "train.jsonl",
                                               student_tokenizer=self.tokenizer,
                                               teacher_tokenizer=self.teacher_tokenizer,
                                               alignment=align, limit=d.train_num, **kw)
                self.dev_set = build_dataset(Path(d.data_dir) / "dev.jsonl",
                                             student_tokenizer=self.tokenizer, limit=d.dev_num, **kw)
            dist.barrier()
        tpad = self.teacher_tokenizer.pad_token_id if self.teacher_tokenizer is not None else None
        self.collator = self.teacher_source.wrap_collator(
            DistillCollator(self.tokenizer.pad_token_id, tpad, alignment=align), self.train_set)
        self.dev_collator = DistillCollator(self.tokenizer.pad_token_id)
        self.dev_prompts = []
        if e.eval_gen:
            prompts = build_prompt_dataset(Path(d.data_dir) / "dev.jsonl", self.tokenizer,
                                           d.max_prompt_length, limit=d.dev_num)
            self.dev_prompts = prompts if e.eval_gen_num < 0 else prompts[: e.eval_gen_num]
        self.sampler = ResumableDistributedSampler(len(self.train_set), rank=dist.rank(),
                                                   world_size=dist.world_size(), seed=self.cfg.train.seed)
        self.loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=self.cfg.train.batch_size, sampler=self.sampler,
            collate_fn=self.collator, drop_last=True, num_workers=d.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.cfg.train.seed),  # keeps the global RNG untouched
            persistent_workers=False)

    def _build_engine(self) -> None:
        t = self.cfg.train
        module = DistillModule(self.student, self.criterion)
        groups = optim.param_groups(self.student, self.criterion, lr=t.lr, weight_decay=t.weight_decay,
                                    projector_lr=self.cfg.criterion_options[KDOptions].projector_lr)
        opt = optim.build_optimizer(groups)
        sched = optim.build_scheduler(opt, total=self.total_steps, warmup=t.warmup_iters,
                                      style=t.lr_decay_style, lr=t.lr, lr_min=t.lr_min)
        if self.ds_cfg is not None:
            self.engine = DeepSpeedEngine(module, opt, sched, ds_config=self.ds_cfg)
            self.device = self.engine.device
        else:
            self.engine = TorchEngine(module, opt, sched, device=self.device, precision=t.precision,
                                      clip_grad=t.clip_grad, clip_grad_criterion=t.clip_grad_criterion)
        zero3 = self.ds_cfg is not None and self.engine.zero_stage == 3
        self.teacher = self.teacher_source.place(self.device, self.ds_cfg, zero3)

    def _open_writers(self) -> None:
        self.tb = None
        self.metrics_path = self.save_dir / "metrics.jsonl"
        if not dist.is_main():
            return
        if self.metrics_path.exists() and self.resume_from is not None:
            # drop log lines of steps the interrupted run did after its last checkpoint, and a
            # line torn by a kill in the middle of a write
            keep = []
            for ln in self.metrics_path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(ln)
                except ValueError:
                    if ln.strip():
                        logger.warning("%s: dropping an incomplete line", self.metrics_path)
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= self.state["global_step"]:
                    keep.append(ln)
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.save_dir / "tensorboard"),
                                    purge_step=self.state["global_step"] + 1 if self.resume_from else None)
        except ImportError:  # pragma: no cover - tensorboard is a requirement
            logger.warning("tensorboard is not installed: no event files")

    # ------------------------------------------------------------------ one step
    def _teacher_view(self, batch: dict):
        return self.teacher_source.view(batch, self.criterion.needs_hidden, self.engine.autocast)

    def _step(self, micro: list[dict], acc: dict) -> tuple[float, bool]:
        step = self.state["global_step"]
        dev = self.device
        if self.on_policy is not None:  # some micro-batches get the student's own responses
            micro = self.on_policy.replace(micro, step, self.engine.raw.student, acc, dev)
            n_on = sum(bool(b.get("on_policy", False)) for b in micro)   # the same on every rank
            self._step_kind = "off" if n_on == 0 else "on" if n_on == len(micro) else "mixed"
        local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro)
        total = dist.all_reduce_sum(torch.tensor(float(local_tokens), device=dev))  # one all-reduce
        scale = self.engine.loss_scale(total)
        self.criterion.set_progress(step, self.total_steps)
        self._step_loss = torch.zeros((), device=dev)
        self._step_tokens = total
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            tview = self._teacher_view(batch)
            out = self.engine.forward(batch, tview, last=last)
            loss = out.loss_sum.float() * scale
            if self.engine.kind == "deepspeed":
                self._deepspeed_finite_guard(out.loss_sum)
            self.engine.backward(loss, last=last)
            self._step_loss = self._step_loss + out.loss_sum.detach().float()
            self._accumulate(acc, out)
        norm, skipped = self.engine.finish_step()
        return norm, skipped

    def _deepspeed_finite_guard(self, loss_sum: torch.Tensor) -> None:
        """DeepSpeed applies the update inside its step, so a non-finite loss must be caught before
        backward; it cannot be skipped there: save the last good state and abort."""
        bad = dist.all_reduce_max((~torch.isfinite(loss_sum.detach())).float().reshape(1))
        if bool(bad.item()):
            where = self._save_abort_state()
            raise TrainingAborted(f"non-finite loss at step {self.state['global_step']} under "
                                  "DeepSpeed (its steps cannot be skipped); last good state: "
                                  f"{where}")

    @staticmethod
    def _accumulate(acc: dict, out) -> None:
        def add(k, v):
            v = v.detach().float()
            acc[k] = acc[k] + v if k in acc else v

        add("loss", out.loss_sum)
        add("tokens", out.n_tokens.float() if torch.is_tensor(out.n_tokens)
            else torch.tensor(float(out.n_tokens), device=out.loss_sum.device))
        add("micro_batches", torch.ones((), device=out.loss_sum.device))
        for k, v in out.metrics.items():
            if k in ("loss", "tokens", "micro_batches"):  # the loop's own keys
                continue
            add(k, v if torch.is_tensor(v) else torch.tensor(float(v), device=out.loss_sum.device))

    def _reduce_log(self, acc: dict) -> dict[str, float]:
        """One all-reduce for every metric of the interval; token-sum metrics / tokens, ``stat/``
        metrics / micro-batches."""
        keys = sorted(acc)
        vec = dist.all_reduce_sum(torch.stack([acc[k].reshape(()) for k in keys]).double())
        vals = dict(zip(keys, vec.tolist()))
        tok, mb = max(1.0, vals.pop("tokens")), max(1.0, vals.pop("micro_batches"))
        return {k: (v / mb if k.startswith("stat/") else v / tok) for k, v in vals.items()} | {
            "tokens": tok}

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        st = self.state
        acc: dict = {}
        hooks: dict = {}
        last_log_t = time.time()
        last_saved = st["global_step"] if self.resume_from is not None else -1
        bar = Progress(self.run_steps, st["global_step"], enabled=dist.is_main())
        logger.info("training: %d steps (%d per epoch, %d epochs), effective batch %d, %s engine, "
                    "precision %s", self.total_steps, self.ipe, cfg.derived["num_epochs"],
                    cfg.derived["effective_batch_size"], self.engine.kind, t.precision)
        self.engine.module.train()
        if self.teacher is not None:
            self.teacher.eval()
        try:
            with StopSignals() as signals:
                dev = self._train_epochs(signals, acc, hooks, last_log_t, last_saved, bar)
        finally:
            bar.close()
        if self._should_stop():
            logger.info("early stop: the dev loss has not improved for %d evaluations (best %.4f)",
                        st["evals_without_improvement"], st["best_dev_loss"])
        logger.info("training done at step %d", st["global_step"])
        ckpt_io.write_run_state(self.save_dir, "finished", step=st["global_step"])
        return {"global_step": st["global_step"], "dev": dev}

    def _step_signals(self, signals: StopSignals) -> tuple[float, bool]:
        """The global mean loss of the step just taken and whether any rank was asked to stop
        (one all-reduce, so every rank decides alike)."""
        vec = torch.stack([self._step_loss.double(), torch.tensor(
            1.0 if signals.requested else 0.0, dtype=torch.float64, device=self._step_loss.device)])
        loss_sum, stop = dist.all_reduce_sum(vec).tolist()
        return loss_sum / max(1.0, float(self._step_tokens)), stop > 0

    def _train_epochs(self, signals, acc, hooks, last_log_t, last_saved, bar) -> dict | None:
        cfg, t, st = self.cfg, self.cfg.train, self.state
        gas = t.gradient_accumulation_steps
        while (st["global_step"] < self.run_steps and st["epoch"] < cfg.derived["num_epochs"]
               and not self._should_stop()):
            self.sampler.set_position(st["epoch"], st["consumed"] * t.batch_size)
            it = iter(self.loader)
            while st["consumed"] < self.ipe * gas and st["global_step"] < self.run_steps:
                micro = [next(it) for _ in range(gas)]
                norm, skipped = self._step(micro, acc)
                st["consumed"] += gas
                if skipped:
                    st["nan_streak"] += 1
                    logger.warning("step %d: non-finite gradient norm, step skipped (%d in a row, "
                                   "patience %d)", st["global_step"] + 1, st["nan_streak"], t.nan_patience)
                    if st["nan_streak"] >= t.nan_patience:
                        where = self._save_abort_state()
                        raise TrainingAborted(
                            f"{st['nan_streak']} consecutive non-finite steps (--nan-patience "
                            f"{t.nan_patience}); last good state: {where}")
                else:
                    st["nan_streak"] = 0
                    st["global_step"] += 1
                    hooks.update(self.criterion.after_optimizer_step(dist.all_reduce_mean) or {})
                step = st["global_step"]
                step_loss, stop = self._step_signals(signals)
                if not skipped:
                    bar.step(step_loss, self.engine.lr()[0])
                why = None if skipped else self.divergence.update(step_loss, self._step_kind)
                st.update(self.divergence.state())
                if not skipped and (why is not None or step % t.log_interval == 0 or step == self.run_steps):
                    last_log_t = self._log(acc, hooks, norm, last_log_t, bar)
                    acc, hooks = {}, {}
                if why is not None:
                    self._diverged(f"step {step}: {why}")
                epoch_done = st["consumed"] >= self.ipe * gas
                if epoch_done:
                    st["epoch"] += 1
                    st["consumed"] = 0
                if stop:
                    self._interrupted(last_saved)
                if skipped and not epoch_done:
                    continue
                dev = self.evaluate() if self._due(step, epoch_done, t.eval_interval) else None
                if dev is not None:
                    self._track_dev_loss(dev["loss"])
                if self._due(step, epoch_done, t.save_interval) or (dev is not None and self._should_stop()):
                    self._save(dev=dev)
                    last_saved = step
                if epoch_done or self._should_stop():
                    break
        dev = None
        if last_saved != st["global_step"]:
            dev = self.evaluate() if (t.eval_interval > 0 or cfg.eval.eval_gen) else None
            self._save(dev=dev)
        return dev

    def _interrupted(self, last_saved: int) -> None:
        step = self.state["global_step"]
        where = "nothing to save (no step taken); --resume starts from scratch"
        if step > 0:
            path = self._save() if last_saved != step else self.save_dir / ckpt_io.checkpoint_name(
                self.state["epoch"], step)
            where = f"resumable state in {path}"
        raise TrainingInterrupted(f"interrupted at step {step}: {where}; continue with --resume")

    def _last_good(self) -> str:
        ckpts = [p for p in ckpt_io.list_checkpoints(self.save_dir)]
        return str(ckpts[-1]) if ckpts else f"none (no checkpoint was written in {self.save_dir})"

    def _diverged(self, why: str) -> None:
        raise TrainingDiverged(f"{why}; nothing saved for this state; last good checkpoint: "
                               f"{self._last_good()}")

    def _save_abort_state(self) -> str:
        """The state after the last good step as ``*_nan-abort`` when its weights are finite; else
        the last checkpoint. Returns where the last good state is."""
        if all_finite(self.engine.params if self.engine.kind == "torch" else self.engine.raw.parameters()):
            return str(self._save(tag="nan-abort"))
        return f"{self._last_good()} (the current weights are not finite and were not saved)"

    def _track_dev_loss(self, loss: float) -> None:
        st = self.state
        if st["best_dev_loss"] is None or loss < st["best_dev_loss"]:
            st["best_dev_loss"], st["evals_without_improvement"] = loss, 0
        else:
            st["evals_without_improvement"] += 1

    def _should_stop(self) -> bool:
        patience = self.cfg.train.early_stop_patience
        return patience > 0 and self.state["evals_without_improvement"] >= patience

    def _data_layout(self) -> list[int]:
        t = self.cfg.train
        return [self.world, t.batch_size, t.gradient_accumulation_steps, len(self.train_set)]

    def _due(self, step: int, epoch_done: bool, interval: int) -> bool:
        if interval <= 0:
            return False
        if self.cfg.train.interval_unit == "step":
            return step % interval == 0
        return epoch_done and self.state["epoch"] % interval == 0

    def _log(self, acc: dict, hooks: dict, norm: float, t0: float, bar: Progress) -> float:
        """Write the interval's record (every metric) to metrics.jsonl and TensorBoard; the console
        gets one summary line (:mod:`mckd.train.console`)."""
        vals = self._reduce_log(acc) if acc else {}
        now = time.time()
        st = self.state
        lrs = self.engine.lr()
        rec = {"step": st["global_step"], "epoch": st["epoch"] + st["consumed"] / max(1, self.ipe * self.cfg.train.gradient_accumulation_steps),
               **vals, "grad_norm": norm, "lr": lrs[0], "lr_last_group": lrs[-1],
               "tokens_per_s": vals.get("tokens", 0.0) / max(1e-9, now - t0),
               **getattr(self.engine, "last_norms", {})}
        rec.update({k: float(v) for k, v in hooks.items()})
        if dist.is_main():
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tb is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(f"train/{k}", v, rec["step"])
            logger.info("%s", bar.log(rec))
        return now

    # ------------------------------------------------------------------ eval / save
    def evaluate(self) -> dict:
        e = self.cfg.eval
        student = self.engine.raw.student
        res = dev_eval.teacher_forced(student, self.dev_set, self.dev_collator,
                                      batch_size=e.eval_batch_size, device=self.device,
                                      autocast=self.engine.autocast)
        out = {"loss": res["loss"], "accuracy": res["accuracy"]}
        if e.eval_gen and self.dev_prompts:
            zero3 = self.engine.kind == "deepspeed" and self.engine.zero_stage == 3
            with self.engine.autocast():
                scores, _ = dev_eval.generation_scores(
                    student, self.tokenizer, self.dev_prompts, batch_size=e.eval_batch_size,
                    max_new_tokens=self.cfg.derived["max_new_tokens"], do_sample=e.do_sample,
                    top_p=e.top_p, top_k=e.top_k, temperature=e.temperature,
                    no_repeat_ngram_size=e.no_repeat_ngram_size, seed=self.cfg.train.seed,
                    repeat_times=e.eval_gen_repeat_times, synced_gpus=zero3)
            out.update(scores)
        step = self.state["global_step"]
        bad = non_finite_metrics(out)
        if dist.is_main():
            logger.info("dev | step %d | %s", step, " ".join(f"{k}={v:.4f}" for k, v in out.items()))
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, "split": "dev", **out}) + "\n")
            if self.tb is not None:
                for k, v in out.items():
                    if math.isfinite(v):
                        self.tb.add_scalar(f"dev/{k}", v, step)
        if bad:
            self._diverged(f"step {step}: non-finite dev metrics ({', '.join(bad)})")
        return out

    def _save(self, dev: dict | None = None, tag: str | None = None) -> Path:
        if non_finite_metrics(dev):
            self._diverged(f"non-finite dev metrics {dev}")
        params = self.engine.params if self.engine.kind == "torch" else list(self.engine.raw.parameters())
        if not all_finite(params):
            self._diverged(f"step {self.state['global_step']}: the weights are not finite")
        error = None
        if dist.is_main():
            try:
                rundir.check_free_space(self.save_dir, ckpt_io.checkpoint_bytes(
                    self.engine.raw.student, self.criterion), "a checkpoint")
            except rundir.RunDirError as e:
                error = str(e)
        error = dist.all_gather_object(error)[0]
        if error:
            raise rundir.RunDirError(error)
        st = self.state
        name = ckpt_io.checkpoint_name(st["epoch"], st["global_step"])
        if tag is not None:
            name += f"_{tag}"
        state = {"loop": dict(st), "dev": dev or {}, "total_steps": self.total_steps,
                 "data_layout": self._data_layout(),
                 "world_size": self.world, "criterion": self.cfg.model.criterion}
        path = ckpt_io.save_checkpoint(self.save_dir, name, engine=self.engine,
                                       student=self.engine.raw.student, criterion=self.criterion,
                                       tokenizer=self.tokenizer, trainer_state=state,
                                       only_save_projector=self.cfg.train.only_save_projector)
        if tag is None:
            eval_gen = self.cfg.eval.eval_gen
            ckpt_io.prune_checkpoints(self.save_dir, self.cfg.train.keep_best_n_checkpoints,
                                      higher_is_better=eval_gen, score_key="rougeL" if eval_gen else "loss")
        dist.barrier()
        return path

    def discard_if_nothing_saved(self) -> None:
        """A new run that failed before its first checkpoint leaves nothing to resume: remove what
        it wrote so that the corrected command can run again in the same directory."""
        import shutil

        if not dist.is_main() or ckpt_io.list_checkpoints(self.save_dir):
            return
        _close_file_logging(self.save_dir)
        if getattr(self, "tb", None) is not None:
            self.tb.close()
            self.tb = None
        for name in rundir.run_entries(self.save_dir):
            p = self.save_dir / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        logger.info("nothing was saved: removed the files of this run from %s", self.save_dir)
        self.run_dir.lock.release()
        if self.run_dir.created:
            with contextlib.suppress(OSError):
                self.save_dir.rmdir()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        dist.cleanup()


def run(cfg: Config) -> dict:
    """Setup, train, cleanup. Returns the final step and dev metrics.

    The run directory's lock is released at the end; ``run_state.json`` records a divergence,
    an interruption or a failure."""
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        return trainer.train()
    except BaseException as e:
        if getattr(trainer, "committed", False):
            status = ("diverged" if isinstance(e, TrainingAborted) else
                      "interrupted" if isinstance(e, (TrainingInterrupted, KeyboardInterrupt)) else "failed")
            ckpt_io.write_run_state(trainer.save_dir, status, step=trainer.state["global_step"],
                                    message=str(e) or type(e).__name__)
            if status == "failed" and not cfg.train.resume:
                trainer.discard_if_nothing_saved()
        raise
    finally:
        if getattr(trainer, "tb", None) is not None:
            trainer.tb.close()
        if getattr(trainer, "run_dir", None) is not None:
            trainer.run_dir.lock.release()
        _close_file_logging(Path(cfg.train.save_dir))
        dist.cleanup()

"""Training step from the offline teacher cache against a live-teacher step; cache size and build speed.

Rows (criterion x teacher source), each in its own fresh process (so that its resident memory is
its own): vanilla KD (``various_divergence``, forward KL; GPT2-base student <- GPT2-1.5B-shaped
teacher), DSKD-CMA and MCW-KD (default preset) (GPT2-base <- Qwen1.5-1.8B-shaped teacher).

* ``live``: student forward + backward, teacher forward (``no_grad``, eval), criterion, AdamW step.
* ``cached``: the same, the teacher's view coming from a cache on disk instead: the memory-mapped
  shard read of the batch's examples (:meth:`TeacherCacheReader.collate`, what the DataLoader's
  collator does), the full-vocabulary logits rebuilt from the top-k entries
  (:func:`dense_logits`), hidden states and the stored embedding table / head. The teacher is never
  built in this process.

Reported per row: median step time over ``--repeats`` steps after one warm-up step; resident
memory after the warm-up (weights, optimizer state, cache mappings: what the run holds); the step's
peak above that; the process peak. Cache: bytes per example on disk (top-k values in
``--cache-dtype``, int32 ids, fp32 log Z and tail mass, hidden states, int32 input ids; positions =
the example's real tokens). Teacher probe (always full depth, one fresh process per teacher): the
teacher's resident memory (what a cached run does not hold) and the builder's work for one batch
(teacher forward with hidden states, top-k, shard write: build throughput), which is also the
teacher forward a cached step no longer pays.

Models (random weights built from configs, nothing downloaded): GPT2-base (12 layers, 768, V 50257);
GPT2-1.5B shape (48 layers, 1600, 25 heads); Qwen1.5-1.8B shape (24 layers, 2048, intermediate 5504,
16 heads, untied head, V 151936). ``--student-layers`` / ``--teacher-layers`` cut the depth.
Batch layout of :mod:`harness` (35 % prompt, 55 % labels, 10 % padding).

``--interleave``: one fresh process per criterion holds the student, the live teacher and the
cache; warm-up steps of both, then ``--repeats`` rounds of (live step, cached step), so that load
from other processes hits both alike; the step peak is measured around every step in that process
(peak resident set reset before the step, minus the resident set then); "built" memory is the
resident memory each mode's build and warm-up step added (student, its AdamW state, criterion,
batch, and the teacher or the cache's tables and the pages of them the step touched). After the
timed rounds the same process times the builder's inner loop on ``--build-examples`` batches with
the same teacher (examples/s, positions/s; once per teacher shape).

Run (CPU, one thread: a full-depth live step took 28-35 s, a cached one 7-14 s)::

    python benchmarks/bench_teacher_cache.py --batch 1 --length 512 --student-layers 2 --teacher-layers 2 \
        --repeats 3 --json benchmarks/results/cpu_teacher_cache.json
    python benchmarks/bench_teacher_cache.py --batch 1 --length 512 --interleave --repeats 2 --top-k 1024 \
        --no-teacher-probe --build-examples 2 --json benchmarks/results/cpu_teacher_cache_full_depth.json
    # GPU
    python benchmarks/bench_teacher_cache.py --device cuda --dtype bf16 --batch 4 --length 512 --interleave \
        --repeats 10 --build-examples 4
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROWS = ("various_divergence", "dual_space_kd_with_cma", "mcw_kd")


def _rss_mib(key: str) -> float:
    return harness._status_kib(key) / 1024


def build_student(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    layers = args.student_layers or 12
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=768, n_head=12, n_layer=layers,
                                   n_positions=max(1024, args.length), resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    return m.to(args.device, harness.DTYPES[args.dtype]), layers


def build_teacher(row, args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    if row == "various_divergence":
        layers = args.teacher_layers or 48
        m = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=1600, n_head=25, n_layer=layers,
                                       n_positions=max(1024, args.length)))
    else:
        layers = args.teacher_layers or 24
        m = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=5504,
                                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                                         tie_word_embeddings=False, max_position_embeddings=max(2048, args.length)))
    return m.to(args.device, harness.DTYPES[args.dtype]).eval().requires_grad_(False), layers


def teacher_shape(row):
    return harness.GPT2_XL if row == "various_divergence" else harness.QWEN_1_8B


def make_criterion(row, args):
    from mckd.criteria import get_criterion_class
    from mckd.criteria.mcw.presets import preset

    D_t = teacher_shape(row)["hidden"]
    if row == "various_divergence":
        return get_criterion_class(row)(kd_objective="forward_kl", kd_rate=0.5)
    if row == "mcw_kd":
        return get_criterion_class(row)(768, D_t, options=preset("default"), kd_rate=0.5)
    return get_criterion_class(row)(768, D_t)


def write_cache(row, batch, args, directory: Path) -> dict:
    """A cache directory holding the batch's examples (synthetic top-k values of the right shapes),
    and, for criteria that read them, the teacher's embedding table and head."""
    import torch

    from mckd.teacher_cache.manifest import WEIGHTS_FILE, make_fingerprint, write_manifest
    from mckd.teacher_cache.shards import shard_name, write_shard

    shape, dt = teacher_shape(row), harness.DTYPES[args.cache_dtype]
    V, D, K = shape["vocab"], shape["hidden"], args.top_k
    att = batch.get("teacher_attention_mask", batch["attention_mask"]).bool().cpu()
    ids = batch.get("teacher_input_ids", batch["input_ids"]).cpu()
    N = int(att.sum())
    g = torch.Generator().manual_seed(0)
    vals = (torch.randn(N, K, generator=g) * 3).sort(-1, descending=True).values
    tensors = {"example_index": torch.arange(att.shape[0]), "offsets": torch.cat([torch.zeros(1, dtype=torch.long),
                                                                                 att.sum(1).cumsum(0)]),
               "input_ids": ids[att].to(torch.int32), "topk_values": vals.to(dt),
               "topk_ids": torch.rand(N, V, generator=g).topk(K, -1).indices.to(torch.int32),
               "logsumexp": vals[:, 0] + 1.0, "tail_logmass": torch.full((N,), -3.0)}
    if row != "various_divergence":
        tensors["hidden"] = torch.randn(N, D, generator=g).to(dt)
    nbytes = write_shard(directory / shard_name(0), tensors, {})
    store = ["logits"] + (["hidden", "embed_tokens", "lm_head"] if row != "various_divergence" else [])
    if row != "various_divergence":
        write_shard(directory / WEIGHTS_FILE, {"embed_tokens.weight": torch.randn(V, D, generator=g).to(dt) * 0.02,
                                               "lm_head.weight": torch.randn(V, D, generator=g).to(dt) * 0.02}, {})
    fp = make_fingerprint(teacher_weights="-", teacher_tokenizer="-", data_file="-", max_length=args.length,
                          max_prompt_length=args.length // 2, top_k=K, dtype=args.cache_dtype,
                          teacher_dtype=args.dtype, store=store, limit=-1)
    write_manifest(directory, {"fingerprint": fp, "complete": True, "teacher": {"vocab_size": V, "hidden_size": D},
                               "shards": [{"file": shard_name(0), "bytes": nbytes}]})
    return {"shard_bytes": nbytes, "examples": att.shape[0], "positions": N}


def build_step(row, mode, args, tmp: Path):
    """Everything a step needs, and the step itself (closure)."""
    import torch

    from mckd.criteria.base import ModelView
    from mckd.criteria.common import count_tokens
    from mckd.models.loading import model_view

    harness.configure_cpu(args.threads)
    student, s_layers = build_student(args)
    crit = make_criterion(row, args).to(args.device)
    batch = harness.make_inputs(args.batch, args.length, teacher=teacher_shape(row), device=args.device,
                                dtype=args.dtype, views=False).batch
    opt = torch.optim.AdamW(list(student.parameters()) + list(crit.parameters()), lr=1e-5)
    need_h = crit.needs_hidden
    info = {"student_layers": s_layers}
    pre = "teacher_" if "teacher_input_ids" in batch else ""
    if mode == "live":
        teacher, info["teacher_layers"] = build_teacher(row, args)

        def teacher_view():
            with torch.no_grad():
                out = teacher(input_ids=batch[pre + "input_ids"], attention_mask=batch[pre + "attention_mask"],
                              output_hidden_states=need_h)
            return model_view(teacher, out, with_hidden=need_h)
    else:
        from mckd.teacher_cache.shards import TeacherCacheReader, cached_head_modules, dense_logits

        info.update(write_cache(row, batch, args, tmp))
        reader = TeacherCacheReader(tmp)
        emb, head = cached_head_modules({k: v.to(args.device) for k, v in reader.teacher_weights().items()})
        att = batch[pre + "attention_mask"].bool().cpu()
        id_lists = [r[m].tolist() for r, m in zip(batch[pre + "input_ids"].cpu(), att)]

        def teacher_view():
            c = reader.collate(list(range(att.shape[0])), id_lists, att.shape[1], hidden=need_h)
            c = {k[len("teacher_cache_"):]: v.to(args.device) for k, v in c.items()}
            z = dense_logits(c["topk_values"], c["topk_ids"], c["logsumexp"], c["tail_logmass"], c["mask"],
                             reader.vocab)
            return ModelView(z, c.get("hidden"), emb, head)

    def step():
        s_out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=need_h)
        t_view = teacher_view()
        out = crit(batch, model_view(student, s_out, with_hidden=need_h), t_view)
        (out.loss_sum / count_tokens(batch["labels"]).clamp_min(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.batch = batch
    step.teacher = teacher if mode == "live" else None
    return step, info


def _build_probe(teacher, batch, args, tmp: Path) -> tuple[float, int]:
    """Seconds and shard bytes of the builder's work for one batch: teacher forward with hidden
    states, top-k entries, the shard write (:mod:`mckd.teacher_cache.build`)."""
    import torch

    from mckd.teacher_cache.build import topk_entries
    from mckd.teacher_cache.shards import write_shard

    pre = "teacher_" if "teacher_input_ids" in batch else ""
    t0 = time.perf_counter()
    with torch.no_grad():
        out = teacher(input_ids=batch[pre + "input_ids"], attention_mask=batch[pre + "attention_mask"],
                      output_hidden_states=True)
    m = batch[pre + "attention_mask"].bool()
    e = topk_entries(out.logits[m], args.top_k)
    e["topk_values"] = e["topk_values"].to(harness.DTYPES[args.cache_dtype])
    e["hidden"] = out.hidden_states[-1][m].to(harness.DTYPES[args.cache_dtype])
    e["input_ids"] = batch[pre + "input_ids"][m].to(torch.int32)
    nbytes = write_shard(tmp / "build_probe.safetensors", {k: v.cpu() for k, v in e.items()}, {})
    return time.perf_counter() - t0, nbytes


def worker(row, mode, args, queue) -> None:
    import gc

    import torch

    try:
        with tempfile.TemporaryDirectory(prefix="bench_tc_") as tmp:
            step, info = build_step(row, mode, args, Path(tmp))
            step()  # warm-up
            gc.collect()
            resident = _rss_mib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak resident set to the current one
            times = []
            for _ in range(args.repeats):
                harness.sync(args.device)
                t0 = time.perf_counter()
                step()
                harness.sync(args.device)
                times.append(time.perf_counter() - t0)
            res = {"row": row, "mode": mode, "B": args.batch, "T": args.length, "device": args.device,
                   "dtype": args.dtype, **info, **harness.summary(times), "resident_MiB": resident,
                   "step_peak_MiB": _rss_mib("VmHWM") - resident,
                   "process_peak_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            if args.device == "cuda":
                res["cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2 ** 20
            queue.put(res)
    except Exception as e:  # noqa: BLE001 - reported in the table
        queue.put({"row": row, "mode": mode, "error": f"{type(e).__name__}: {e}"})


def teacher_worker(row, args, queue) -> None:
    """Full-depth teacher alone: its resident memory and the builder's work for one batch."""
    import gc

    try:
        harness.configure_cpu(args.threads)
        with tempfile.TemporaryDirectory(prefix="bench_tc_") as tmp:
            base = _rss_mib("VmRSS")
            teacher, layers = build_teacher(row, args)
            gc.collect()
            resident = _rss_mib("VmRSS") - base
            batch = harness.make_inputs(args.batch, args.length, teacher=teacher_shape(row), device=args.device,
                                        dtype=args.dtype, views=False).batch
            secs, nbytes = _build_probe(teacher, batch, args, Path(tmp))
            queue.put({"row": row, "mode": "teacher", "teacher_layers": layers, "teacher_resident_MiB": resident,
                       "build_s_per_batch": secs, "build_examples_per_s": args.batch / secs,
                       "build_bytes_per_example": nbytes / args.batch, "B": args.batch, "T": args.length})
    except Exception as e:  # noqa: BLE001
        queue.put({"row": row, "mode": "teacher", "error": f"{type(e).__name__}: {e}"})


def pair_worker(row, args, queue) -> None:
    """Live and cached steps of one criterion in one process, interleaved; then the build probe.
    Step peak: resident set on CPU, ``max_memory_allocated`` on CUDA, above the value before the step."""
    import gc
    import statistics

    import torch

    try:
        with tempfile.TemporaryDirectory(prefix="bench_tc_") as tmp:
            harness.configure_cpu(args.threads)
            gc.collect()
            rss0 = _rss_mib("VmRSS")
            step_live, info = build_step(row, "live", args, Path(tmp) / "unused")
            teacher = step_live.teacher
            step_live()                  # warm-up (AdamW state, lazy allocations, mapped pages touched)
            gc.collect()
            rss1 = _rss_mib("VmRSS")
            (Path(tmp) / "cache").mkdir()
            step_cached, cinfo = build_step(row, "cached", args, Path(tmp) / "cache")
            step_cached()
            gc.collect()
            rss2 = _rss_mib("VmRSS")
            info.update(cinfo)
            steps = {"live": step_live, "cached": step_cached}
            times = {m: [] for m in steps}
            peaks = {m: [] for m in steps}
            cuda = args.device == "cuda"
            for _ in range(args.repeats):
                for mode, fn in steps.items():
                    gc.collect()
                    before = _rss_mib("VmRSS")
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")     # reset the peak resident set to the current one
                    harness.sync(args.device)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                        before = torch.cuda.memory_allocated() / 2 ** 20
                    t0 = time.perf_counter()
                    fn()
                    harness.sync(args.device)
                    times[mode].append(time.perf_counter() - t0)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else _rss_mib("VmHWM")
                    peaks[mode].append(peak - before)
            rows = []
            for mode in steps:
                rows.append({"row": row, "mode": mode, "B": args.batch, "T": args.length, "device": args.device,
                             "dtype": args.dtype, **info, **harness.summary(times[mode]),
                             "step_peak_MiB": max(peaks[mode]),
                             # resident memory the mode's build and warm-up step added: student, its
                             # AdamW state, criterion, batch and the teacher (live) or the cache (cached)
                             "built_MiB": (rss1 - rss0) if mode == "live" else (rss2 - rss1),
                             "times_s": times[mode]})
            if args.build_examples:
                probe = [_build_probe(teacher, step_live.batch, args, Path(tmp))
                         for _ in range(args.build_examples)]
                secs = statistics.median(s for s, _ in probe)
                n_pos = int(step_live.batch.get("teacher_attention_mask", step_live.batch["attention_mask"]).sum())
                rows.append({"row": row, "mode": "build", "teacher_layers": info["teacher_layers"], "B": args.batch,
                             "T": args.length, "build_s_per_batch": secs, "build_examples_per_s": args.batch / secs,
                             "build_positions_per_s": n_pos / secs, "build_bytes_per_example": probe[0][1] / args.batch,
                             "times_s": [s for s, _ in probe]})
            queue.put(rows)
    except Exception as e:  # noqa: BLE001 - reported in the table
        queue.put([{"row": row, "mode": "pair", "error": f"{type(e).__name__}: {e}"}])


def run_interleaved(args) -> list[dict]:
    results = []
    print("| criterion | teacher | step ms (median) | cached / live | step peak MiB | built MiB |")
    print("|---|---|---|---|---|---|")
    builds = []
    probed = set()
    for row in args.rows:
        shape = teacher_shape(row)["hidden"]     # one build probe per teacher shape
        row_args = argparse.Namespace(**{**vars(args), "build_examples": 0 if shape in probed else args.build_examples})
        probed.add(shape)
        rows = harness.run_in_fresh_process(pair_worker, row, row_args)
        results.extend(rows)
        by = {r["mode"]: r for r in rows}
        if "error" in by.get("pair", {}):
            print(f"| {row} | error: {by['pair']['error']} |", flush=True)
            continue
        for mode in ("live", "cached"):
            r = by[mode]
            print(f"| {row} | {mode} | {r['median_ms']:.0f} | {r['median_ms'] / by['live']['median_ms']:.2f} | "
                  f"{r['step_peak_MiB']:.0f} | {r['built_MiB']:.0f} |", flush=True)
        print(f"# {row}: layers student {by['live']['student_layers']}, teacher {by['live']['teacher_layers']}; "
              f"cache {by['cached']['shard_bytes'] / by['cached']['examples'] / 2 ** 20:.3f} MiB per example "
              f"({by['cached']['positions'] / by['cached']['examples']:.0f} positions); step seconds live "
              f"{[round(t, 1) for t in by['live']['times_s']]}, cached {[round(t, 1) for t in by['cached']['times_s']]}"
              f"; {harness.machine()}", flush=True)
        if "build" in by:
            builds.append(by["build"])
    if builds:
        print("\n| teacher (build inner loop) | layers | s per batch (median) | examples/s | positions/s | "
              "MiB per example |")
        print("|---|---|---|---|---|---|")
        for r in builds:
            name = "GPT2-1.5B shape" if r["row"] == "various_divergence" else "Qwen1.5-1.8B shape"
            print(f"| {name} ({r['row']} run) | {r['teacher_layers']} | {r['build_s_per_batch']:.1f} | "
                  f"{r['build_examples_per_s']:.4f} | {r['build_positions_per_s']:.1f} | "
                  f"{r['build_bytes_per_example'] / 2 ** 20:.2f} |", flush=True)
    return results


def run_fresh(row, mode, args) -> dict:
    if mode == "teacher":
        return harness.run_in_fresh_process(teacher_worker, row, args)
    return harness.run_in_fresh_process(worker, row, mode, args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(harness.DTYPES))
    p.add_argument("--cache-dtype", default="bf16", choices=tuple(harness.DTYPES))
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--student-layers", type=int, default=None, help="default: 12 (full depth)")
    p.add_argument("--teacher-layers", type=int, default=None, help="default: full depth (48 / 24)")
    p.add_argument("--no-teacher-probe", dest="teacher_probe", action="store_false",
                   help="skip the full-depth teacher probe (resident memory, build throughput)")
    p.add_argument("--interleave", action="store_true",
                   help="live and cached steps of a criterion in one process, in interleaved rounds")
    p.add_argument("--build-examples", type=int, default=0,
                   help="with --interleave: time the builder's inner loop on this many batches")
    p.add_argument("--json")
    args = p.parse_args(argv)
    print(f"# {harness.machine()}; B={args.batch}, L={args.length}, {args.device}, {args.dtype}, cache "
          f"{args.cache_dtype} top-{args.top_k}", flush=True)
    if args.interleave:
        results = run_interleaved(args)
        if args.teacher_probe:
            print("# --interleave: the separate teacher probe is not run (use --build-examples)")
        return harness.finish(results, args.json)
    results = []
    print("| criterion | teacher | step ms (median) | x live | resident MiB | step peak MiB | process peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in args.rows:
        pair = {}
        for mode in ("live", "cached"):
            r = run_fresh(row, mode, args)
            results.append(r)
            pair[mode] = r
            if "error" in r:
                print(f"| {row} | {mode} | error: {r['error']} |", flush=True)
                continue
            ratio = r["median_ms"] / pair["live"]["median_ms"] if "median_ms" in pair.get("live", {}) else 1.0
            print(f"| {row} | {mode} | {r['median_ms']:.0f} | {ratio:.2f} | {r['resident_MiB']:.0f} | "
                  f"{r['step_peak_MiB']:.0f} | {r['process_peak_MiB']:.0f} |", flush=True)
        cached = pair.get("cached", {})
        if "shard_bytes" in cached:
            print(f"# {row}: cache {cached['shard_bytes'] / cached['examples'] / 2 ** 20:.3f} MiB per example "
                  f"({cached['positions'] / cached['examples']:.0f} positions)", flush=True)
    if args.teacher_probe:
        probe_args = argparse.Namespace(**{**vars(args), "teacher_layers": None})
        print("\n| teacher (full depth) | layers | resident MiB | build: s per batch | examples/s | MiB per example |")
        print("|---|---|---|---|---|---|")
        for row in dict.fromkeys("various_divergence" if r == "various_divergence" else "qwen" for r in args.rows):
            r = run_fresh("various_divergence" if row == "various_divergence" else "dual_space_kd_with_cma",
                          "teacher", probe_args)
            results.append(r)
            name = "GPT2-1.5B shape" if row == "various_divergence" else "Qwen1.5-1.8B shape"
            if "error" in r:
                print(f"| {name} | error: {r['error']} |", flush=True)
                continue
            print(f"| {name} | {r['teacher_layers']} | {r['teacher_resident_MiB']:.0f} | {r['build_s_per_batch']:.1f} | "
                  f"{r['build_examples_per_s']:.3f} | {r['build_bytes_per_example'] / 2 ** 20:.2f} |", flush=True)
    return harness.finish(results, args.json)


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the criterion benchmarks: realistic random inputs, interleaved timing, peak memory.

Inputs (:func:`make_inputs`): every example has a 35 % prompt, a 55 % response (the label
positions, as on Dolly-like data) and 10 % right padding, the same layout for both tokenizations of
length ``T``. Student logits and hidden states require grad (as after a student forward); the
teacher's do not. Embedding tables double as (tied) output heads. All batch keys any criterion
reads are present: ids, labels, attention masks, character offsets, the DTW pairs MCW-KD's
``dtw`` cost reads, the MinED alignment index and the exact/boundary alignment indices (the data
pipeline precomputes all of them).

Timing (:func:`time_interleaved`): one warm-up call each, then ``repeats`` rounds in which every
function runs once (round robin), so that load from other processes hits every row alike; the
median and the minimum are reported. Peak memory (:func:`peak_memory_fresh_process`): on CPU the
peak resident set of a fresh process running one step, minus its resident set once the inputs
exist; on CUDA ``max_memory_allocated`` above the inputs.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "code", ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from torch import nn  # noqa: E402

PROMPT_SHARE, RESPONSE_SHARE = 0.35, 0.55
GPT2_BASE = dict(vocab=50257, hidden=768)
GPT2_XL = dict(vocab=50257, hidden=1600)
QWEN_1_8B = dict(vocab=151936, hidden=2048)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Inputs:
    """One benchmark batch: ``batch`` keys plus the model views' tensors."""

    batch: dict
    student: object                   # ModelView
    teacher: object | None            # ModelView
    words: list = field(default_factory=list)  # (B, T) token strings for the published Python DTW


def add_common_args(p, *, memory: bool = True) -> None:
    """The flags every benchmark script shares (device, dtype, repeats, threads, output)."""
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--keep-denormals", action="store_true",
                   help="CPU: do not flush denormal floats to zero (see configure_cpu)")
    if memory:
        p.add_argument("--no-memory", dest="memory", action="store_false",
                       help="CPU: skip the peak-memory pass (one fresh process per row and length)")
    p.add_argument("--json", help="also write the rows to this file")


def configure_cpu(threads: int, flush_denormal: bool = True) -> None:
    """Torch CPU threads, and flush denormal floats to zero (x86 FTZ/DAZ).

    Softmaxes of peaked random logits produce many denormal probabilities; on x86 every
    arithmetic operation on a denormal is 10-100x slower (measured: the backward GEMM of
    dual_space_kd's student head took 4.8 s instead of 0.2 s), which GPUs do not suffer from. The
    benchmarks therefore flush them unless ``--keep-denormals`` is given.
    """
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)


def layout(B: int, T: int, device: str):
    """(labels mask, attention mask) of the 35/55/10 layout, each (B, T) bool."""
    p, r = int(PROMPT_SHARE * T), max(1, int(RESPONSE_SHARE * T))
    pos = torch.arange(T)[None].expand(B, -1)
    return ((pos >= p) & (pos < p + r)).to(device), (pos < p + r).to(device)


def make_inputs(B: int, T: int, *, student=GPT2_BASE, teacher=QWEN_1_8B, device="cpu", dtype="fp32",
                seed=0, with_words=False, views=True) -> Inputs:
    """Random inputs of realistic shapes (see the module docstring).

    Args:
        B, T: batch size and sequence length (both tokenizations).
        student, teacher: dicts with ``vocab`` and ``hidden`` (teacher None: no teacher).
        device, dtype: where and in which dtype (``fp32``/``bf16``) logits and hidden states live.
        with_words: also make random token strings for the published per-step Python DTW.
        views: False: the batch only (no logits or hidden states; the views are None).
    """
    from mckd.criteria import ModelView

    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    lab_mask, att = layout(B, T, "cpu")

    def ids(V):
        return torch.randint(0, V, (B, T), generator=g)

    def labels(V):
        return ids(V).masked_fill(~lab_mask, -100)

    starts = torch.arange(T)[None].expand(B, -1) * 3
    off = torch.stack([starts, starts + 3], -1) * att[..., None]
    Vs, Ds = student["vocab"], student["hidden"]
    batch = {"input_ids": ids(Vs), "labels": labels(Vs), "attention_mask": att.long(), "offsets": off}
    s_view = t_view = None
    if views:
        emb_s = nn.Embedding(Vs, Ds).to(device, dt).requires_grad_(False)
        s_view = ModelView((torch.randn(B, T, Vs, generator=g) * 3).to(device, dt).requires_grad_(True),
                           torch.randn(B, T, Ds, generator=g).to(device, dt).requires_grad_(True), emb_s, emb_s)
    if teacher is not None:
        Vt, Dt = teacher["vocab"], teacher["hidden"]
        if Vt != Vs:
            batch.update(teacher_input_ids=ids(Vt), teacher_labels=labels(Vt), teacher_attention_mask=att.long(),
                         teacher_offsets=off)
        if views:
            emb_t = nn.Embedding(Vt, Dt).to(device, dt).requires_grad_(False)
            t_view = ModelView((torch.randn(B, T, Vt, generator=g) * 3).to(device, dt),
                               torch.randn(B, T, Dt, generator=g).to(device, dt), emb_t, emb_t)
    # precomputed alignments (the data pipeline's): diagonal DTW pairs, MinED index on label positions
    idx = torch.arange(T)
    batch["dtw_index"] = torch.stack([idx, idx], -1)[None].expand(B, -1, -1).contiguous()
    batch["dtw_value"] = torch.rand(B, T, generator=g)
    batch["dtw_mask"] = att.clone()
    batch["mined_teacher_index"] = idx[None].expand(B, -1).masked_fill(~lab_mask, -1).contiguous()
    # exact token alignment: diagonal pairs on every label position but every 9th (exact, ~89 %) and
    # every 18th (boundary, ~94 %): the shares measured on Dolly for GPT-2 <- Qwen1.5
    diag = idx[None].expand(B, -1)
    batch["exact_teacher_index"] = diag.masked_fill(~lab_mask | (idx % 9 == 8), -1).contiguous()
    batch["boundary_teacher_index"] = diag.masked_fill(~lab_mask | (idx % 18 == 17), -1).contiguous()
    batch = {k: v.to(device) for k, v in batch.items()}
    words = []
    if with_words:
        rng = random.Random(seed)
        words = [["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(T)]
                 for _ in range(B)]
    return Inputs(batch, s_view, t_view, words)


def clear_grads(inp: Inputs) -> None:
    inp.student.logits.grad = None
    inp.student.hidden.grad = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device: str, repeats: int, *, warmup: bool = True,
                     once: tuple = ()) -> dict:
    """Seconds per call of each function, interleaved round robin.

    Args:
        fns: name -> zero-argument callable (one forward + backward).
        repeats: rounds. once: names timed in the first round only (slow reference loops).

    Returns:
        name -> list of seconds.
    """
    times = {n: [] for n in fns}
    if warmup:
        for n, fn in fns.items():
            if n not in once:
                fn()
    for r in range(repeats):
        for n, fn in fns.items():
            if n in once and r:
                continue
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def summary(seconds: list) -> dict:
    return {"median_ms": 1000 * statistics.median(seconds), "min_ms": 1000 * min(seconds), "n": len(seconds)}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _memory_worker(builder, args, queue) -> None:
    try:
        fn = builder(*args)             # builds the inputs and returns the step
        if getattr(fn, "warmup", True):
            fn()                        # warm-up: lazy allocations and caches are not the step's
        getattr(fn, "clear", lambda: None)()   # drop the warm-up's gradients before the baseline
        import gc
        gc.collect()
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                # Linux: reset the peak resident set (VmHWM) to the current one
        fn()
        queue.put((_status_kib("VmHWM") - base) / 1024)
    except Exception as e:  # noqa: BLE001 - reported in the table
        queue.put(f"{type(e).__name__}: {e}")


def peak_memory_fresh_process(builder, *args):
    """MiB of peak resident memory above the inputs of one step in a fresh (spawned) process
    (Linux: the peak resident set, reset after a warm-up step, minus the resident set then).

    ``builder(*args)`` must be a picklable module-level function that builds everything and
    returns the zero-argument step (with an optional ``clear`` attribute that frees the gradients
    it leaves). Returns a float, or an error string.
    """
    return run_in_fresh_process(_memory_worker, builder, args)


def run_in_fresh_process(target, *args):
    """``target(*args, queue)`` in a spawned process whose freed memory leaves its resident set;
    returns the one object it puts on ``queue``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, q))
    # glibc: a fixed mmap threshold returns every freed tensor buffer to the OS at once (the default
    # threshold grows after frees and lets the heap reuse them, hiding allocations from the RSS)
    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        proc.start()
    finally:
        if old is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    out = q.get()
    proc.join()
    return out


def cuda_peak_mib(fn) -> float:
    """MiB allocated above the current allocation while ``fn`` runs (CUDA)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def machine() -> str:
    """One line: CPU/GPU, threads, torch version, load average."""
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = platform.processor() or platform.machine()
    load = os.getloadavg()
    return (f"{dev}; {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {time.strftime('%Y-%m-%d %H:%M %Z')}")


def finish(results, json_path: str | None) -> int:
    """End of a benchmark script: the closing machine line, and the rows as json when asked."""
    import json

    print(f"# done: {machine()}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))
    return 0

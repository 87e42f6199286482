"""Forward + backward time and peak memory of every criterion outside the model passes, beside plain CE.

Run (CPU by default, one torch thread; on a GPU add ``--device cuda --dtype bf16``)::

    python benchmarks/bench_criteria.py                                         # B=4, L=128
    python benchmarks/bench_criteria.py --lengths 128 256 512 --repeats 3 --json criteria.json
    python benchmarks/bench_criteria.py --device cuda --dtype bf16 --lengths 128 256 512 --repeats 10
    python benchmarks/bench_criteria.py --rows dual_space_kd_with_cma mcw_kd:default --lengths 512

Shapes: GPT2-base student (V_s = 50257, D_s = 768); a GPT2-1.5B-shaped teacher (V = 50257,
D = 1600) for the same-vocabulary criteria (``various_divergence``, ``dual_space_kd``) and a
Qwen1.5-1.8B-shaped teacher (V_t = 151936, D_t = 2048) for the cross-vocabulary ones. Layout and
method: :mod:`harness` (35 % prompt, 55 % labels, 10 % padding; interleaved repeats, median; peak
memory of one step in a fresh process on CPU, ``max_memory_allocated`` on CUDA). Every row of one
length uses the same student tensors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness import GPT2_BASE, GPT2_XL, QWEN_1_8B  # noqa: E402

MINED_MAP = harness.ROOT.parent / "shared" / "reference" / "vocab_alignment" / "qwen_to_gpt2" / "tea2stu_id_mapping.json"
ROWS = {  # row -> (teacher shape, criterion name, constructor kwargs)
    "cross_entropy": (None, "cross_entropy", {}),
    "various_divergence": (GPT2_XL, "various_divergence", {"kd_objective": "forward_kl"}),
    "various_divergence:adaptive_kl": (GPT2_XL, "various_divergence", {"kd_objective": "adaptive_kl"}),
    "dual_space_kd": (GPT2_XL, "dual_space_kd", {}),
    "dual_space_kd_with_cma": (QWEN_1_8B, "dual_space_kd_with_cma", {}),
    "universal_logit_distillation": (QWEN_1_8B, "universal_logit_distillation", {}),
    "min_edit_dis_kld": (QWEN_1_8B, "min_edit_dis_kld", {}),
    "multi_level_ot": (QWEN_1_8B, "multi_level_ot", {}),
    "mcw_kd:default": (QWEN_1_8B, "mcw_kd", {"preset": "default"}),
    "mcw_kd:reference": (QWEN_1_8B, "mcw_kd", {"preset": "reference"}),
    "mcw_kd:exact": (QWEN_1_8B, "mcw_kd", {"preset": "default", "exact_kl_weight": 1.0}),
    "dual_space_kd_v2": (QWEN_1_8B, "dual_space_kd_v2", {"s2t": "pinv"}),
    "dual_space_kd_v2:linear": (QWEN_1_8B, "dual_space_kd_v2", {"s2t": "linear"}),
    "uld_hybrid": (QWEN_1_8B, "uld_hybrid", {}),
    "dwa_kd": (QWEN_1_8B, "dwa_kd", {}),
}
SHARED_STRINGS = 42257  # Qwen1.5 -> GPT-2 shared-string map size (mckd.data.shared_vocab, measured)


def build_criterion(row: str, device: str, dtype: str):
    """The criterion of ``row``, on ``device`` in ``dtype``."""
    from mckd.criteria import get_criterion_class
    from mckd.criteria.mcw.presets import preset

    teacher, name, kw = ROWS[row]
    cls = get_criterion_class(name)
    if name in ("dual_space_kd", "dual_space_kd_with_cma"):
        crit = cls(GPT2_BASE["hidden"], teacher["hidden"], **kw)
    elif name == "mcw_kd":
        extra = {k: v for k, v in kw.items() if k != "preset"}
        crit = cls(GPT2_BASE["hidden"], teacher["hidden"], options=preset(kw["preset"], **extra), kd_rate=0.5,
                   tea2stu=_shared_map(teacher) if extra else None)
    elif name == "dual_space_kd_v2":
        crit = _dskdv2(cls, teacher, kw["s2t"])
    elif name == "uld_hybrid":
        crit = cls(_shared_map(teacher), GPT2_BASE["vocab"])
    elif name == "dwa_kd":
        crit = cls(GPT2_BASE["hidden"], teacher["hidden"])
    elif name == "min_edit_dis_kld":
        crit = cls(_mined_map(), student_vocab=GPT2_BASE["vocab"], teacher_vocab=teacher["vocab"], kd_rate=0.5)
    else:
        crit = cls(**kw)
    return crit.to(device=device, dtype=harness.DTYPES[dtype])


def _shared_map(teacher):
    """A one-to-one teacher -> student map with the measured number of shared strings."""
    import torch

    g = torch.Generator().manual_seed(0)
    m = torch.full((teacher["vocab"],), -1, dtype=torch.long)
    m[torch.randperm(teacher["vocab"], generator=g)[:SHARED_STRINGS]] = \
        torch.randperm(GPT2_BASE["vocab"], generator=g)[:SHARED_STRINGS]
    return m


def _dskdv2(cls, teacher, s2t):
    """DSKDv2 with random projectors; in ``pinv`` mode the s2t map's buffers get the published shapes
    (K overlapping strings) without paying for the pseudo-inverse at construction."""
    import torch

    crit = cls(GPT2_BASE["hidden"], teacher["hidden"], _shared_map(teacher), s2t="linear", projector_init="random")
    if s2t == "pinv":
        p = crit.projectors
        del p.s2t
        p.s2t_mode = "pinv"
        g = torch.Generator().manual_seed(1)
        p.register_buffer("overlap_student_ids", torch.randperm(GPT2_BASE["vocab"], generator=g)[:SHARED_STRINGS],
                          persistent=False)
        p.register_buffer("teacher_head_pinv", torch.randn(SHARED_STRINGS, teacher["hidden"], generator=g) * 0.01,
                          persistent=False)
    return crit


def _mined_map():
    """The published Qwen -> GPT-2 map when ../shared has it, else a random many-to-one map."""
    import torch

    if MINED_MAP.is_file():
        from mckd.data.vocab_map import load_vocab_map
        return load_vocab_map(MINED_MAP)
    return torch.randint(0, GPT2_BASE["vocab"], (151646,), generator=torch.Generator().manual_seed(0)).tolist()


def step_fn(crit, inp):
    def step():
        harness.clear_grads(inp)
        crit(inp.batch, inp.student, inp.teacher).loss_sum.backward()
    step.clear = lambda: harness.clear_grads(inp)
    return step


def build_step(row: str, B: int, T: int, device: str, dtype: str, threads: int, flush_denormal: bool = True):
    """Inputs + criterion of one row (used by the fresh-process memory measurement)."""
    harness.configure_cpu(threads, flush_denormal)
    inp = harness.make_inputs(B, T, teacher=ROWS[row][0], device=device, dtype=dtype)
    return step_fn(build_criterion(row, device, dtype), inp)


def run_length(rows, B, T, args) -> list[dict]:
    """Time every row at one length, interleaved, on shared inputs."""
    inputs = {}
    fns = {}
    for row in rows:
        shape = ROWS[row][0]
        key = None if shape is None else shape["hidden"]
        if key not in inputs:
            inputs[key] = harness.make_inputs(B, T, teacher=shape, device=args.device, dtype=args.dtype)
        fns[row] = step_fn(build_criterion(row, args.device, args.dtype), inputs[key])
    times = harness.time_interleaved(fns, args.device, args.repeats)
    out = []
    for row in rows:
        res = {"row": row, "B": B, "T": T, "device": args.device, "dtype": args.dtype, **harness.summary(times[row])}
        if args.device == "cuda":
            res["peak_mib"] = harness.cuda_peak_mib(fns[row])
        elif args.memory:
            res["peak_mib"] = harness.peak_memory_fresh_process(build_step, row, B, T, args.device, args.dtype,
                                                                args.threads, not args.keep_denormals)
        out.append(res)
    del fns, inputs
    return out


def print_rows(results: list[dict], base_row: str = "cross_entropy") -> None:
    """Markdown table: ms (median, min), ratio to the base row's median, peak MiB."""
    base = {r["T"]: r["median_ms"] for r in results if r["row"] == base_row}
    print(f"| row | L | median ms | min ms | x {base_row} | peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        mem = r.get("peak_mib", "-")
        mem = f"{mem:.0f}" if isinstance(mem, float) else str(mem)
        ratio = r["median_ms"] / base[r["T"]] if r["T"] in base else float("nan")
        print(f"| {r['row']} | {r['T']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {ratio:.1f} | {mem} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    harness.add_common_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[128])
    args = p.parse_args(argv)
    harness.configure_cpu(args.threads, not args.keep_denormals)
    print(f"# {harness.machine()}; B={args.batch}, {args.device}, {args.dtype}, "
          f"flush denormals {not args.keep_denormals}", flush=True)
    results = []
    for T in args.lengths:
        res = run_length(args.rows, args.batch, T, args)
        results.extend(res)
        print_rows(res)
    return harness.finish(results, args.json)


if __name__ == "__main__":
    sys.exit(main())

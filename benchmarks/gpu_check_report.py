"""The GPU check's output files: ``summary.md``, ``results.json`` and ``logs.txt`` (see gpu_check.py)."""
from __future__ import annotations

import json
from pathlib import Path

TARGETS = {"published_over_mcw": 50.0, "step_over_cma": 1.3}


def _f(x, nd=1, unit="") -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.{nd}f}{unit}"


def _by(rows, key="row"):
    out = {}
    for r in rows:
        out.setdefault(r["T"], {})[r[key]] = r
    return out


def mcw_lines(rows) -> list[str]:
    lines = ["| row | L | median ms | min ms | peak MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['T']} | {_f(r['median_ms'])} | {_f(r['min_ms'])} | {_f(r.get('peak_mib'), 0)} |"
              for r in rows]
    lines += ["", "| L | published / mcw_kd:reference (target >= 50x at L = 512) | published:ot / mcw_ot:reference "
              "| mcw_kd:default / dual_space_kd_with_cma | mcw_kd:reference / dual_space_kd_with_cma |",
              "|---|---|---|---|---|"]
    for T, m in sorted(_by(rows).items()):
        def ratio(a, b):
            return m[a]["median_ms"] / m[b]["median_ms"] if a in m and b in m else None
        lines.append(f"| {T} | {_f(ratio('published', 'mcw_kd:reference'), 1, 'x')} | "
                     f"{_f(ratio('published:ot', 'mcw_ot:reference'), 1, 'x')} | "
                     f"{_f(ratio('mcw_kd:default', 'dual_space_kd_with_cma'), 2, 'x')} | "
                     f"{_f(ratio('mcw_kd:reference', 'dual_space_kd_with_cma'), 2, 'x')} |")
    return lines


def step_lines(rows) -> list[str]:
    lines = ["| row | L | layers (student, teacher) | median ms | min ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['T']} | {r.get('student_layers')}, {r.get('teacher_layers')} | "
              f"{_f(r['median_ms'])} | {_f(r['min_ms'])} |" for r in rows]
    for T, m in sorted(_by(rows).items()):
        for r in ("mcw_kd:default", "mcw_kd:reference"):
            if r in m and "dual_space_kd_with_cma" in m:
                x = m[r]["median_ms"] / m["dual_space_kd_with_cma"]["median_ms"]
                lines.append(f"\nL = {T}: step {r} / dual_space_kd_with_cma = **{x:.2f}x** (target <= "
                             f"{TARGETS['step_over_cma']}x: {'met' if x <= TARGETS['step_over_cma'] else 'not met'})")
    return lines


def criteria_bench_lines(rows) -> list[str]:
    lines = ["| row | L | median ms | min ms | peak MiB |", "|---|---|---|---|---|"]
    return lines + [f"| {r['row']} | {r['T']} | {_f(r['median_ms'])} | {_f(r['min_ms'])} | "
                    f"{_f(r.get('peak_mib'), 0)} |" for r in rows]


def generation_lines(rows) -> list[str]:
    lines = ["| path | prompts | new tokens | seconds | examples/s | new tokens/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("summary"):
            lines.append(f"\nbatched / per-example loop: {r['speedup_examples_per_s']}x examples/s, "
                         f"{r['speedup_new_tokens_per_s']}x new tokens/s ({r['params_M']} M parameters, "
                         f"{r['dtype']}, batch {r['batch_size']}, {r['max_new_tokens']} new tokens)")
        else:
            lines.append(f"| {r['path']} | {r['n']} | {r['new_tokens']} | {r['seconds']} | {r['examples_per_s']} | "
                         f"{r['new_tokens_per_s']} |")
    return lines


def criteria_lines(data) -> list[str]:
    tol = data["tolerance"]
    lines = [f"Pass: loss and gradients finite, |loss - fp32 loss| <= {tol['loss_rtol']} |fp32 loss| + "
             f"{tol['loss_atol']} (per-token loss), cosine(student gradient, fp32 one) >= {tol['grad_cos_min']}.",
             "", "| criterion | T_s / T_t | fp32 loss | autocast: dev / tol, grad cos | bf16 weights: dev / tol, "
             "grad cos | host syncs (bf16 step) | status |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['criterion']} | {r.get('T_s')} / {r.get('T_t')} | - | - | - | - | "
                         f"fail: {r['error'][:160]} |")
            continue
        cells = [f"{_f(r[m]['abs_dev'], 4)} / {_f(r[m]['tol'], 4)}, {_f(r[m]['grad_cos'], 5)}"
                 for m in ("autocast", "bf16")]
        syncs = r["bf16"].get("host_syncs")
        lines.append(f"| {r['criterion']} | {r['T_s']} / {r['T_t'] or '-'} | {_f(r['fp32']['loss'], 4)} | "
                     f"{cells[0]} | {cells[1]} | {'-' if syncs is None else syncs} | {r['status']} |")
    return lines


def write_outputs(out: Path, results: dict, logs: Path, *, total: float, mode: str, log_tail: int) -> None:
    """Write the three output files into ``out``."""
    env = results.get("env", {}).get("info", {})
    setup = results.get("setup", {}).get("info", {})
    md = [f"# GPU check ({mode} mode)", "",
          f"Device: {env.get('device')} (CUDA {env.get('cuda')}, {env.get('gpu_memory_gib', '-')} GiB), "
          f"{env.get('cpu_count')} CPU cores; {env.get('date')}; total {total} s.", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
          + "; minimum accepted: " + ", ".join(f"{k} {v}" for k, v in env.get("minimum", {}).items()), ""]
    if setup:
        def shape(m):
            return f"{m['layers']} layers, hidden {m['hidden']}, V {m['vocab']}"
        md += [f"Models (random init, saved in {setup['saved_dtype']}): student GPT-2 {shape(setup['student'])}; "
               f"teacher Qwen2 {shape(setup['teacher'])}; {setup['tokenizers']}.", ""]
    md += ["| part | status | seconds | notes |", "|---|---|---|---|"]
    for name, r in results.items():
        note = r.get("reason") or ""
        if name.startswith("train:") and r["status"] == "pass":
            note = (f"{r['steps']} steps, loss {_f(r['loss_first'], 3)} -> {_f(r['loss_last'], 3)}, "
                    f"resumed, {r['checkpoint']}, eval ROUGE-L {_f(r.get('eval_rougeL'), 2)}")
        md.append(f"| {name} | **{r['status']}** | {r['seconds']} | {note} |")
    sections = (("criteria", "Criteria in bf16 against fp32 (B x L, real data pipeline)",
                 lambda r: criteria_lines(r["data"])),
                ("bench_mcw", "bench_mcw: MCW-KD vs the published formulation and DSKD-CMA",
                 lambda r: mcw_lines(r["rows"])),
                ("bench_step", "bench_step: whole training step", lambda r: step_lines(r["rows"])),
                ("bench_criteria", "bench_criteria: every criterion, time and peak memory",
                 lambda r: criteria_bench_lines(r["rows"])),
                ("bench_generation", "bench_generation: batched generation vs a per-example loop",
                 lambda r: generation_lines(r["rows"])))
    for key, title, fn in sections:
        r = results.get(key, {})
        if "data" in r or "rows" in r:
            md += ["", f"## {title}", "", *fn(r)]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps({"mode": mode, "total_seconds": total, "parts": results}, indent=1))
    chunks = []
    for name in results:
        p = logs / f"{name.replace(':', '-')}.log"
        text = p.read_text(errors="replace") if p.is_file() else ""
        cut = "" if len(text) <= log_tail else f"[... {len(text) - log_tail} characters before]\n"
        chunks.append(f"===== {name} ({results[name]['status']}) =====\n{cut}{text[-log_tail:]}\n")
    (out / "logs.txt").write_text("\n".join(chunks))

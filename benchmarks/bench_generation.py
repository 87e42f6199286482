"""Generation throughput: batched (length-sorted, left-padded, KV cache) vs a per-example loop.

Both paths use the evaluation protocol's decoding (sampling, top-p 1.0, top-k 0, temperature 1.0,
no_repeat_ngram_size 6) on the same prompts (Dolly test prompts, <= 256 tokens) and the same
random-init model; the report gives examples/s, new tokens/s and the batched/loop ratio of one run.

    # CPU, tiny model (2 layers, hidden 64, real GPT-2 vocabulary)
    python benchmarks/bench_generation.py --size tiny --n 32 --batch-size 16 --max-new-tokens 32
    # GPU, GPT2-base-size random-init model, bf16
    python benchmarks/bench_generation.py --size base --n 256 --batch-size 64 --max-new-tokens 256

Prints one JSON line per path and a summary line; ``--json PATH`` also writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

from mckd.data.prompts import build_prompt_dataset  # noqa: E402
from mckd.evaluation.generate import generate_batched, generation_kwargs, strip_generated  # noqa: E402
from mckd.evaluation.loading import pick_dtype  # noqa: E402
from mckd.models.tokenizers import load_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine  # noqa: E402

SHARED = Path(os.environ.get("MCKD_SHARED", ROOT.parent / "shared"))
HUB = {"gpt2": "gpt2/gpt2-base", "qwen": "qwen/Qwen1.5-1.8B", "llama2": "llama2/llama2-7b-hf"}


def build_model(family: str, size: str, hub: Path, dtype: torch.dtype, device: torch.device):
    """Random-init model from the family's config: ``tiny`` (2 layers, hidden 64) or ``base`` (as is
    for GPT-2: 12 layers, hidden 768)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hub / HUB[family], local_files_only=True)
    if size == "tiny":
        if cfg.model_type == "gpt2":
            cfg.n_layer, cfg.n_embd, cfg.n_head = 2, 64, 4
        else:
            cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads = 2, 64, 4
            cfg.num_key_value_heads, cfg.intermediate_size = 4, 128
            if hasattr(cfg, "head_dim"):
                cfg.head_dim = 16
            if hasattr(cfg, "layer_types"):
                cfg.layer_types = cfg.layer_types[:2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device).eval()


def run_loop(model, tok, prompts, kw, device) -> list[list[int]]:
    """The straightforward baseline: one unpadded ``generate`` call per example."""
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        out.extend(strip_generated(seq[:, ids.shape[1]:], [tok.eos_token_id]))
    return out


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    res = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return res, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="gpt2", choices=sorted(HUB))
    ap.add_argument("--size", default="tiny", choices=("tiny", "base"))
    ap.add_argument("--hub", default=str(SHARED / "model_hub"), help="folder with <family>/<model>/config.json")
    ap.add_argument("--data", default=str(SHARED / "data" / "dolly" / "valid.jsonl"))
    ap.add_argument("--n", type=int, default=32, help="number of prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--loop-n", type=int, default=None, help="prompts for the loop baseline (default: --n)")
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of the protocol's sampling")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    dtype = pick_dtype(args.dtype, device)
    tok = load_tokenizer(str(Path(args.hub) / HUB[args.family]))
    prompts = [r["prompt_ids"] for r in build_prompt_dataset(args.data, tok, 256, limit=args.n)]
    model = build_model(args.family, args.size, Path(args.hub), dtype, device)
    n_params = sum(p.numel() for p in model.parameters())
    kw = generation_kwargs(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, top_p=1.0, top_k=0, temperature=1.0,
                           no_repeat_ngram_size=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=1, do_sample=not args.greedy)
    generate_batched(model, tok, prompts[:args.batch_size], **{**gen, "max_new_tokens": 2})  # warm-up
    loop_prompts = prompts[:args.loop_n or args.n]

    print(f"# {machine()}", flush=True)
    rows = []
    outs, sec = timed(lambda: generate_batched(model, tok, prompts, **gen), device)
    rows.append({"path": "batched", "n": len(prompts), "new_tokens": sum(map(len, outs)), "seconds": sec})
    outs, sec = timed(lambda: run_loop(model, tok, loop_prompts, kw, device), device)
    rows.append({"path": "per_example_loop", "n": len(loop_prompts), "new_tokens": sum(map(len, outs)),
                 "seconds": sec})
    info = {"family": args.family, "size": args.size, "params_M": round(n_params / 1e6, 2), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "dtype": str(dtype),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "greedy": args.greedy,
            "torch_threads": torch.get_num_threads()}
    for r in rows:
        r.update(info, examples_per_s=round(r["n"] / r["seconds"], 3),
                 new_tokens_per_s=round(r["new_tokens"] / r["seconds"], 1), seconds=round(r["seconds"], 3))
        print(json.dumps(r))
    b, lp = rows
    summary = {"summary": True, **info, "speedup_examples_per_s": round(b["examples_per_s"] / lp["examples_per_s"], 2),
               "speedup_new_tokens_per_s": round(b["new_tokens_per_s"] / lp["new_tokens_per_s"], 2)}
    print(json.dumps(summary))
    print(f"# done: {machine()}")
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in rows + [summary]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

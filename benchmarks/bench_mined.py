"""Time one MinED loss step (forward + backward) against a plain same-vocabulary KD step.

Run (CPU by default; ``--device cuda`` on a GPU)::

    python benchmarks/bench_mined.py                          # B=2, T=128, Qwen1.5 -> GPT-2 sizes
    python benchmarks/bench_mined.py --batch 4 --length 256 --device cuda

The alignment (``mined_teacher_index``) is precomputed by the data pipeline, so a MinED step is
only tensor work: one gather of the K mapped teacher columns, one ``index_copy`` into the student
vocabulary, then the same forward KL as vanilla KD. Logits are random; the map is the published
Qwen -> GPT-2 file when ../shared is present (else a random many-to-one map of the same sizes).
Printed: median milliseconds per step of CE alone, vanilla KD (``various_divergence``,
forward KL, teacher logits already in the student vocabulary) and MinED.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mckd.criteria import ModelView, get_criterion_class  # noqa: E402
from mckd.criteria.min_edit_dis_kld import MinEditDisKLD  # noqa: E402

MAP = ROOT.parent / "shared" / "reference" / "vocab_alignment" / "qwen_to_gpt2" / "tea2stu_id_mapping.json"


def view(x: torch.Tensor) -> ModelView:
    return ModelView(logits=x, hidden=None, embed_tokens=nn.Identity(), lm_head=nn.Identity())


def timed(fns: dict, device: str, repeats: int) -> dict:
    """Median milliseconds per call of each function; calls are interleaved (round robin) so
    that load from other processes affects all of them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=128, help="T_s = T_t")
    p.add_argument("--student-vocab", type=int, default=50257)
    p.add_argument("--teacher-vocab", type=int, default=151936)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    dev, B, T, V_s, V_t = a.device, a.batch, a.length, a.student_vocab, a.teacher_vocab
    g = torch.Generator().manual_seed(0)
    if MAP.is_file() and V_s == 50257:
        from mckd.data.vocab_map import load_vocab_map
        tea2stu = load_vocab_map(MAP)
    else:
        tea2stu = torch.randint(0, V_s, (min(V_t, 151646),), generator=g).tolist()
    n_map = len(tea2stu)
    labels = torch.randint(0, V_s, (B, T), generator=g)
    labels[:, : T // 4] = -100                                   # a prompt
    t_ids = torch.randint(0, n_map, (B, T), generator=g)
    index = torch.arange(T).expand(B, T).clone()
    index[labels.eq(-100)] = -1
    s_ids = torch.tensor(tea2stu)[t_ids]                         # every content position aligned
    batch = {k: v.to(dev) for k, v in {"input_ids": s_ids, "labels": labels, "teacher_input_ids": t_ids,
                                       "mined_teacher_index": index}.items()}
    s = torch.randn(B, T, V_s, generator=g).to(dev).requires_grad_()
    t = torch.randn(B, T, V_t, generator=g).to(dev)
    t_same = torch.randn(B, T, V_s, generator=g).to(dev)
    ce = get_criterion_class("cross_entropy")().to(dev)
    kd = get_criterion_class("various_divergence")(kd_rate=0.5).to(dev)
    mined = MinEditDisKLD(tea2stu, student_vocab=V_s, teacher_vocab=V_t, kd_rate=0.5).to(dev)

    def step(fn):
        def run():
            s.grad = None
            fn().loss_sum.backward()
        return run

    fns = {"CE only": step(lambda: ce(batch, view(s), None)),
           "vanilla KD (forward KL)": step(lambda: kd(batch, view(s), view(t_same))),
           "MinED": step(lambda: mined(batch, view(s), view(t)))}
    print(f"device={dev} B={B} T={T} V_s={V_s} V_t={V_t} K={mined.stu2tea_student.numel()} "
          f"threads={torch.get_num_threads()} repeats={a.repeats}")
    for name, ms in timed(fns, dev, a.repeats).items():
        print(f"{name:28s} {ms:9.1f} ms / step (forward + backward, median)")

if __name__ == "__main__":
    main()

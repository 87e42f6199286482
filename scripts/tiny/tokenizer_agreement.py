"""How alike two tokenizers segment the same text: boundary agreement and identical token spans.

    python scripts/tiny/tokenizer_agreement.py data/tiny/test.jsonl \
        model_hub/tiny/tokenizers/student model_hub/tiny/tokenizers/teacher
    python scripts/tiny/tokenizer_agreement.py ../shared/data/dolly/valid.jsonl \
        ../shared/model_hub/gpt2/gpt2-base ../shared/model_hub/qwen/Qwen1.5-1.8B

Each example's text is its prompt followed by its first reference. Token spans come from the
character offsets of both fast tokenizers, with whitespace trimmed from both ends of every span
(GPT-2's ``Ġword`` and Llama's ``▁word`` cover the same word); whitespace-only tokens are left out.

* boundary agreement: |E_a ∩ E_b| / |E_a ∪ E_b| over the sets of span end positions;
* identical spans (a) / (b): the share of tokenizer a's (b's) spans that tokenizer b (a) also has
  (the positions an exact token alignment can pair);
* tokens per example of each tokenizer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "code"))


def trimmed_spans(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans with surrounding whitespace removed; whitespace-only tokens dropped."""
    out = []
    for a, b in offsets:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if a < b:
            out.append((a, b))
    return out


def agreement(texts: list[str], tok_a, tok_b) -> dict:
    """Corpus-level boundary agreement, identical-span shares and lengths of ``tok_a`` vs ``tok_b``."""
    inter = union = same = n_a = n_b = 0
    for text in texts:
        sa = trimmed_spans(text, tok_a(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"])
        sb = trimmed_spans(text, tok_b(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"])
        ea, eb = {b for _, b in sa}, {b for _, b in sb}
        inter += len(ea & eb)
        union += len(ea | eb)
        same += len(set(sa) & set(sb))
        n_a += len(sa)
        n_b += len(sb)
    return {"examples": len(texts), "boundary_agreement": inter / max(union, 1),
            "identical_spans_a": same / max(n_a, 1), "identical_spans_b": same / max(n_b, 1),
            "tokens_per_example_a": n_a / max(len(texts), 1),
            "tokens_per_example_b": n_b / max(len(texts), 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="jsonl file (prompt, output)")
    p.add_argument("tokenizer_a", help="tokenizer directory (the student's)")
    p.add_argument("tokenizer_b", help="tokenizer directory (the teacher's)")
    p.add_argument("--limit", type=int, default=-1, help="first N examples (-1: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    from mckd.data.examples import read_examples
    from mckd.models.tokenizers import load_tokenizer

    texts = [e.prompt + e.outputs[0] for e in read_examples(args.data, limit=args.limit)]
    res = agreement(texts, load_tokenizer(args.tokenizer_a), load_tokenizer(args.tokenizer_b))
    if args.json:
        print(json.dumps(res))
        return
    print(f"{res['examples']} examples of {args.data}")
    print(f"boundary agreement            {res['boundary_agreement']:.3f}")
    print(f"identical spans (of a / of b) {res['identical_spans_a']:.3f} / {res['identical_spans_b']:.3f}")
    print(f"tokens per example (a / b)    {res['tokens_per_example_a']:.1f} / {res['tokens_per_example_b']:.1f}")


if __name__ == "__main__":
    main()

from transformers import AutoModelForCausalLM

from mckd.evaluation.metrics import compute_metrics
from mckd.models.tokenizers import load_tokenizer


def test_tiny_models_load_with_their_tokenizers(tiny_models):
    check_tiny_models(tiny_models, real=False)   # real vocabularies: test_published_assets


def check_tiny_models(tiny_models, real):
    for name, marker in (("gpt2", "\u0120"), ("qwen", "\u0120"), ("mistral", "\u2581")):
        path = tiny_models(name, real=real)
        tok = load_tokenizer(str(path))
        model = AutoModelForCausalLM.from_pretrained(path)
        assert len(tok) - 3 <= model.config.vocab_size  # the tokenizer's vocabulary, never cut
        assert any(t.startswith(marker) for t in tok.convert_ids_to_tokens(tok("a b c").input_ids))
    for name in ("gpt2", "qwen"):
        tok = load_tokenizer(str(tiny_models(name, real=real)))
        assert tok.pad_token_id == tok.eos_token_id


def test_rouge_l_hand_checked():
    # identical -> 100; disjoint -> 0; max over references; stemming makes "cats" match "cat"
    assert compute_metrics(["the cat sat"], [["the cat sat"]])["rougeL"] == 100.0
    assert compute_metrics(["dog"], [["the cat sat"]])["rougeL"] == 0.0
    assert compute_metrics(["cats"], [["dog", "cat"]])["rougeL"] == 100.0
    # LCS "a c" of pred "a b c" (3) vs ref "a c" (2): P=2/3, R=1, F=0.8
    assert abs(compute_metrics(["a b c"], [["a c"]])["rougeL"] - 80.0) < 1e-6
    assert compute_metrics([""], [["anything"]])["rougeL"] == 0.0

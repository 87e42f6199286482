"""Projector grammar, config, warm start; embedding/head access across families and wrappers."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mckd.models import access
from mckd.models.projectors import (DEFAULT_STRUCTURES, build_projectors, load_projector_config,
                                    load_projector_weights, parse_structure)
from conftest import ROOT


def _layers(seq):
    return [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None))
            for m in seq]


def test_grammar_sizes_coefficients_and_relu():
    sizes = {"s": 8, "t": 12, "p": 5}
    assert _layers(parse_structure("t-s", sizes)) == [("Linear", 12, 8)]
    assert _layers(parse_structure("2s-2t", sizes)) == [("Linear", 16, 24)]
    assert _layers(parse_structure("s-2s-relu-t", sizes)) == [
        ("Linear", 8, 16), ("ReLU", None, None), ("Linear", 16, 12)]
    assert _layers(parse_structure("s-p-relu", sizes))[-1][0] == "ReLU"
    out = parse_structure("s-2s-relu-t", sizes)(torch.randn(3, 4, 8))
    assert out.shape == (3, 4, 12)


@pytest.mark.parametrize("bad,msg", [("s-relu-t", "raw input"), ("relu-t", "input size"),
                                     ("s", "two sizes"), ("s-x", "bad token"), ("s-p", "not known")])
def test_grammar_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_structure(bad, {"s": 4, "t": 6, "p": None})


def test_shipped_config_matches_defaults_and_builds_only_requested():
    cfg = load_projector_config(ROOT / "configs" / "projector_config.json")
    assert cfg == DEFAULT_STRUCTURES
    pr = build_projectors(("query", "t2s"), 8, 12, config_path=ROOT / "configs" / "projector_config.json")
    assert set(pr) == {"query", "t2s"}
    assert pr["query"][0].weight.shape == (24, 16)
    with pytest.raises(ValueError, match="missing or disabled"):
        build_projectors(("cproj_s",), 8, 12)


def test_disabled_projector_is_an_error(tmp_path):
    p = tmp_path / "pc.json"
    p.write_text(json.dumps({"t2s": {"enabled": False, "structure": "t-s"}}))
    with pytest.raises(ValueError, match="missing or disabled"):
        build_projectors(("t2s",), 4, 6, config_path=p)


def test_warm_start_exact_names_and_shape_errors(tmp_path):
    src = build_projectors(("t2s", "s2t"), 4, 6)
    state = {f"projectors.{k}": v for k, v in src.state_dict().items()}
    # a projector named like a prefix of another must not capture its weights
    state["t.0.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "projector.pt")
    dst = build_projectors(("t2s", "s2t", "query"), 4, 6)
    loaded = load_projector_weights(dst, tmp_path)
    assert sorted(loaded) == ["s2t", "t2s"]
    torch.testing.assert_close(dst["t2s"][0].weight, src["t2s"][0].weight)
    wrong = build_projectors(("t2s",), 5, 6)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_projector_weights(wrong, tmp_path / "projector.pt")
    with pytest.raises(FileNotFoundError):
        load_projector_weights(dst, tmp_path / "nowhere")


class _Wrapper(nn.Module):
    """Stands in for DDP / DeepSpeedEngine: the model lives in ``.module``."""

    def __init__(self, m):
        super().__init__()
        self.module = m


def _opt_model():
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    return OPTForCausalLM(cfg)


@pytest.mark.parametrize("family", ["gpt2", "qwen", "llama2", "mistral", "opt"])
def test_access_embeddings_and_head_through_wrappers(family, tiny_models):
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    model = _opt_model() if family == "opt" else AutoModelForCausalLM.from_pretrained(tiny_models(family))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    for wrapped in (model, peft, _Wrapper(peft), _Wrapper(_Wrapper(model))):
        assert access.get_input_embeddings(wrapped) is emb
        assert access.get_output_head(wrapped) is head
    ids = torch.tensor([[1, 2, 3]])
    out = peft(input_ids=ids, output_hidden_states=True)
    view = access.model_view(_Wrapper(peft), out.logits, out.hidden_states[-1])
    assert view.lm_head_weight.shape == (out.logits.shape[-1], out.hidden_states[-1].shape[-1])
    torch.testing.assert_close(view.lm_head(view.hidden), out.logits, atol=1e-5, rtol=1e-5)


def test_access_rejects_non_hf_module():
    with pytest.raises(TypeError, match="not a Hugging Face model"):
        access.get_input_embeddings(_Wrapper(nn.Linear(2, 2)))

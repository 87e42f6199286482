"""LoRA: the student trains adapters only and saves an adapter checkpoint; the teacher's adapter
is merged at load."""
from __future__ import annotations

import json

import pytest
import torch

import test_train_support as sup
from mckd.config import parse_config
from mckd.models.loading import ModelLoadError, load_student, load_teacher
from mckd.train.loop import run


@pytest.mark.slow
def test_lora_student_trains_adapters_and_saves_adapter(tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_models("gpt2")
    data = sup.write_data(tmp_path / "data", n_train=8, n_dev=2)
    out = tmp_path / "lora"
    run(parse_config(sup.train_argv(model, data, out, "--total-iters", "2", "--eval-interval", "0",
                                    "--peft", "lora", "--peft-lora-r", "4", "--peft-lora-alpha", "8",
                                    "--peft-target-modules", "c_attn,c_proj")))
    ckpt = out / "epoch1_step2"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"c_attn", "c_proj"}
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    peft = PeftModel.from_pretrained(base, ckpt)
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 0  # adapters moved off zero init


def test_lora_defaults_per_family_and_frozen_base(tiny_models):
    model, tok, family = load_student(str(tiny_models("tinyllama")), peft="lora", lora_r=2,
                                      lora_alpha=4, lora_dropout=0.0)
    assert family == "llama"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable)
    with pytest.raises(ModelLoadError, match="--peft-target-modules"):
        load_student(str(tiny_models("gpt2")), peft="lora", lora_target_modules=["no_such_module"])


def test_teacher_adapter_is_merged_and_frozen(tiny_models, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = str(tiny_models("qwen"))
    base = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    torch.manual_seed(0)
    adapted = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    adapted.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
    teacher, _, _ = load_teacher(path, peft_path=str(tmp_path / "adapter"))
    assert not any("lora" in n for n, _ in teacher.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        got = teacher(input_ids=ids).logits
    plain = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-4)
    with pytest.raises(ModelLoadError, match="--teacher-peft-path"):
        load_teacher(path, peft_path=str(tmp_path))

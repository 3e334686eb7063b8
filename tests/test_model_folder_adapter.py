"""Silent wrong model (issue 25, item 6): an adapter left inside a base model folder is not applied by the loader
(it says so), and a run's output folder may not be, or be inside, the base model folder."""
import contextlib
import io
import shutil
import sys

import pytest
import torch

from llama_ner import train_trainer
from model_hub.make_tiny import tiny_dir
from tuning.errors import run_main


@pytest.fixture
def base_with_adapter(tmp_path):
    """A copy of the tiny LLaMA with a (non-zero) LoRA saved into the model folder itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(tiny_dir("chinese-alpaca-7b"), base)
    model = AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    peft_model.save_pretrained(str(base))
    return base


def test_an_adapter_inside_the_model_folder_is_not_applied(base_with_adapter, capsys):
    from model_hub.loader import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(base_with_adapter))
    assert not any("lora_" in name for name, _ in model.named_parameters()), "the adapter was applied"
    clean, _ = load_model_and_tokenizer(tiny_dir("chinese-alpaca-7b"))
    ids = torch.tensor([[1, 100, 200, 300]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clean(ids).logits)
    assert f"note: {base_with_adapter} also holds a PEFT adapter" in capsys.readouterr().out


@pytest.mark.parametrize("inside", ["", "run"])
def test_training_into_the_base_model_folder_is_refused(base_with_adapter, tmp_path, monkeypatch, inside):
    rows = tmp_path / "train.txt"
    row = '{"instruct": "找出实体", "query": "文本：北京", "answer": "北京_地名"}\n'
    rows.write_text(row * 4, encoding="utf-8")
    out = base_with_adapter / inside if inside else base_with_adapter
    before = sorted(p.name for p in base_with_adapter.iterdir())
    monkeypatch.setattr(sys, "argv", ["x", f"--model_dir={base_with_adapter}", f"--train_path={rows}",
                                      f"--save_dir={out}", "--max_steps=1", "--train_batch_size=2"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as exit_info:
        run_main(train_trainer.main)
    assert exit_info.value.code == 2
    assert err.getvalue().strip().splitlines()[-1] == (
        f"error: {out}: is inside the base model folder {base_with_adapter}; the run's adapter and checkpoints would "
        "mix with the model's files: give another output folder")
    assert sorted(p.name for p in base_with_adapter.iterdir()) == before

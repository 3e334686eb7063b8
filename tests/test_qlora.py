"""QLoRA (issue 21): `quantization_bit` 4 in every recipe on the CPU. Each recipe trains a few steps on a 4-bit
base: the LoRA weights change, the nf4 base weights stay byte-identical, the loss is finite, the adapter resumes
exactly, and it is a normal PEFT adapter that loads onto the full-precision base. Plus the loader's 4/8-bit
settings and the one-line refusals."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from test_distributed import chatglm_rows, glm4_data  # noqa: F401  (fixtures: 16 tokenised alpaca rows, 8 AdvertiseGen)
from test_llama_ner_e2e import data as ner_data  # noqa: F401  (fixture: the e2e test's 40 MSRA rows)
from model_hub.loader import load_model_and_tokenizer
from tuning.errors import UserError, run_main

ALPACA = os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json")
LLAMA, CHATGLM, GLM4 = "tiny:chinese-alpaca-7b", "tiny:chatglm-6b", "tiny:glm-4-9b-chat"


def run(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", *argv])
    return run_main(module.main)


def packed_base(model) -> dict[str, bytes]:
    """Every bitsandbytes 4-bit layer's packed nf4 weight and its (double-quantized) absmax, as raw bytes, keyed
    by the layer's name in the base model (a PeftModel's wrapping stripped)."""
    import bitsandbytes as bnb

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            key = name[name.index("layers."):].replace(".base_layer", "")  # without peft's wrapping
            found[key] = b"".join(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                                  for t in (module.weight.data, state.absmax, state.state2.absmax))
    return found


@functools.cache
def fresh_packed_base(name: str, dtype="fp32") -> dict[str, bytes]:
    model, _ = load_model_and_tokenizer(name, dtype=dtype, quantization_bit=4)
    return packed_base(model)


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def assert_trained_adapter(before: dict, after: dict) -> None:
    """Same keys, every LoRA tensor finite, the B matrices (zero at init) moved, and the weights differ."""
    assert before.keys() == after.keys() and after
    assert all(torch.isfinite(t).all() for t in after.values())
    assert all(t.abs().sum() > 0 for k, t in after.items() if "lora_B" in k)
    assert any(not torch.equal(before[k], after[k]) for k in after)


def assert_loads_on_full_precision_base(name: str, folder, input_ids) -> None:
    """The adapter is a plain PEFT adapter: it loads onto the fp32 base (no bitsandbytes layer anywhere) and
    changes its output."""
    import bitsandbytes as bnb
    from peft import PeftModel

    base, _ = load_model_and_tokenizer(name, dtype="fp32")
    with torch.no_grad():
        plain = base(input_ids=input_ids).logits
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        tuned = model(input_ids=input_ids).logits
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    assert torch.isfinite(tuned).all() and not torch.allclose(plain, tuned)


# ---- the loader ------------------------------------------------------------------------------------------------

def test_4bit_is_nf4_double_quantized_bf16_compute_and_deterministic():
    import bitsandbytes as bnb

    model, _ = load_model_and_tokenizer(LLAMA, quantization_bit=4)
    config = model.config.quantization_config
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant, config.bnb_4bit_compute_dtype) == \
        ("nf4", True, torch.bfloat16)
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # Every decoder linear layer is 4-bit; the output layer (and the embeddings) stay in full precision.
    assert quantized == {n for n in linear if ".layers." in n} and "lm_head" in linear - quantized
    assert model.lm_head.weight.dtype == torch.float32
    assert packed_base(model) == fresh_packed_base(LLAMA)  # quantizing is deterministic: the before/after check


def test_8bit_runs_on_the_cpu():
    import bitsandbytes as bnb

    for kwargs in ({"quantization_bit": 8}, {"load_in_8bit": True}):
        model, tokenizer = load_model_and_tokenizer(LLAMA, **kwargs)
        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
        with torch.no_grad():
            logits = model(**tokenizer(["你好"], return_tensors="pt")).logits
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"quantization_bit": 3}, "quantization_bit: expected 4, 8 or nothing (full precision), got 3"),
    ({"quantization_bit": 4, "load_in_8bit": True},
     "quantization_bit: load_in_8bit and quantization_bit 4 contradict each other; give one of them"),
])
def test_bad_quantization_settings_are_one_line(kwargs, message):
    with pytest.raises(UserError) as error:
        load_model_and_tokenizer(LLAMA, **kwargs)
    assert str(error.value) == message


# ---- llama_ner: HF Trainer, resume, test.py on a 4-bit base, chat_ner.py; the raw DeepSpeed loop ---------------

NER_TRAIN = ["--model_dir=" + LLAMA, "--train_batch_size=2", "--max_steps=2", "--save_steps=1", "--log_steps=1",
             "--learning_rate=1e-2", "--save_total_limit=2", "--quantization_bit=4"]


@pytest.mark.slow
def test_llama_ner_qlora_trains_resumes_and_infers(ner_data, tmp_path, monkeypatch, capsys):
    from llama_ner import chat_ner, train_trainer
    from llama_ner import test as ner_test

    data = [f"--train_path={ner_data / 'train.txt'}", f"--dev_path={ner_data / 'dev.txt'}"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    trainer = run(train_trainer, NER_TRAIN + data + [f"--save_dir={full}/"], monkeypatch)
    # the run says its base is 4-bit (issue 33.9: nothing did)
    assert "base model: 4-bit NF4 weights (bitsandbytes, quantization_bit 4), frozen" in capsys.readouterr().out
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert packed_base(trainer.model) == fresh_packed_base(LLAMA)
    assert_trained_adapter(adapter(full / "checkpoint-1"), adapter(full / "adapter_model"))

    again = run(train_trainer, NER_TRAIN + data + [f"--save_dir={resumed}/",
                                                    f"--resume_from_checkpoint={full / 'checkpoint-1'}"], monkeypatch)
    assert [e["loss"] for e in again.state.log_history if "loss" in e] == losses  # step 1 from the checkpoint
    a, b = adapter(full / "adapter_model"), adapter(resumed / "adapter_model")
    assert all(torch.equal(a[k], b[k]) for k in a)

    ids = torch.tensor([[1, 29871, 30662, 31639, 2]])
    assert_loads_on_full_precision_base(LLAMA, full / "adapter_model", ids)
    # test.py reads quantization_bit 4 from train_args.json: the 4-bit base with the adapter on top.
    capsys.readouterr()
    run(ner_test, [f"--train_args={full / 'adapter_model' / 'train_args.json'}", "--test_path=", "--eval_rows=2",
                   "--max_new_tokens=4", "--teacher_forced_rows=0"], monkeypatch)
    assert (full / "ner_report.json").exists()
    monkeypatch.setitem(chat_ner.GENERATION_CONFIG, "max_new_tokens", 4)  # (400 as the original)
    (tmp_path / "ask.txt").write_text("找出人名：张三去了北京。\n", encoding="utf-8")
    run(chat_ner, ["--base_model", LLAMA, "--lora_model", str(full / "adapter_model"), "--only_cpu",
                   "--quantization_bit", "4", "--data_file", str(tmp_path / "ask.txt"), "--seed", "0",
                   "--predictions_file", str(tmp_path / "predictions.json")], monkeypatch)
    assert len(json.loads((tmp_path / "predictions.json").read_text(encoding="utf-8"))) == 1


@pytest.mark.slow
def test_llama_ner_qlora_raw_deepspeed_loop(ner_data, tmp_path):
    save_dir = tmp_path / "ds"
    argv = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "1", "--master_port",
            "29617", os.path.join(REPO, "llama_ner", "train_deepspeed.py"), f"--train_path={ner_data / 'train.txt'}",
            *[a for a in NER_TRAIN if not a.startswith("--save_total_limit")], f"--save_dir={save_dir}/"]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [float(line.split(",")[0][len("loss:"):]) for line in proc.stdout.splitlines() if line.startswith("loss:")]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(logged)))
    trained = adapter(save_dir)
    assert all(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)
    assert sorted(os.listdir(save_dir / "checkpoints")) == ["global_step2", "latest"]


def test_llama_ner_refuses_quantized_zero3_before_loading(ner_data, tmp_path, monkeypatch, capsys):
    from llama_ner import train_trainer

    with pytest.raises(SystemExit) as exit_info:
        run(train_trainer, NER_TRAIN + [f"--train_path={ner_data / 'train.txt'}", "--local_rank=0",
                                        f"--save_dir={tmp_path}/run/",
                                        f"--deepspeed_jaon_path={REPO}/glm4_finetune/configs/ds_zero_3.json"],
            monkeypatch)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: quantization_bit: 4-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; use a "
        "ZeRO-1/2 DeepSpeed config or drop quantization_bit")
    assert not (tmp_path / "run").exists()


# ---- chatglm_lora: --quantization_bit 4, resume, infer.py on the 4-bit base -----------------------------------

def chatglm_train(rows, out, *extra):
    return ["--dataset_path", str(rows), "--chatglm_path", CHATGLM, "--quantization_bit", "4",
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "1",
            "--learning_rate", "5e-3", "--logging_steps", "1", "--use_cpu", "--seed", "0", "--report_to", "none",
            "--dataloader_num_workers", "0", *extra]


@pytest.mark.slow
def test_chatglm_lora_qlora_trains_resumes_and_infers(chatglm_rows, tmp_path, monkeypatch, capsys):
    from chatglm_lora import finetune, infer

    trainer = run(finetune, chatglm_train(chatglm_rows, tmp_path / "full"), monkeypatch)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert packed_base(trainer.model) == fresh_packed_base(CHATGLM)
    assert_trained_adapter(adapter(tmp_path / "full" / "checkpoint-1"), adapter(tmp_path / "full"))
    again = run(finetune, chatglm_train(chatglm_rows, tmp_path / "resumed", "--resume_from_checkpoint",
                                        str(tmp_path / "full" / "checkpoint-1")), monkeypatch)
    assert [e["loss"] for e in again.state.log_history if "loss" in e] == losses
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert_loads_on_full_precision_base(CHATGLM, tmp_path / "full", torch.tensor([[5, 74874, 130001, 130004, 5]]))
    capsys.readouterr()
    run(infer, ["--chatglm_path", CHATGLM, "--lora_path", str(tmp_path / "full"), "--quantization_bit", "4",
                "--data_path", ALPACA, "--num", "1", "--max_length", "40"], monkeypatch)
    assert "### 1\n" in capsys.readouterr().out


def test_chatglm_lora_refuses_contradicting_and_zero3_quantization(chatglm_rows, tmp_path, monkeypatch, capsys):
    from chatglm_lora import finetune

    for extra, message in [
        (["--load_in_8bit", "true"], "error: quantization_bit: load_in_8bit and quantization_bit 4 contradict each "
                                     "other; give one of them"),
        (["--deepspeed", os.path.join(REPO, "glm4_finetune", "configs", "ds_zero_3.json")],
         "error: quantization_bit: 4-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; use a ZeRO-1/2 "
         "DeepSpeed config or drop quantization_bit"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run(finetune, chatglm_train(chatglm_rows, tmp_path / "out", *extra), monkeypatch)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == message
        assert not (tmp_path / "out").exists()


# ---- GLM-4: YAML quantization_bit, LoRA with resume, P-tuning v2, inference on the 4-bit base ------------------

def glm4_config(path, output_dir, peft, bits=4, **training):
    import yaml

    config = {"data_config": {"train_file": "train.jsonl", "num_proc": 1}, "combine": True, "max_input_length": 32,
              "max_output_length": 32, "quantization_bit": bits,
              "training_args": {"output_dir": str(output_dir), "max_steps": 2, "learning_rate": 5e-2,
                                "per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 1,
                                "logging_steps": 1, "bf16": True, "use_cpu": True, "report_to": "none", "seed": 42,
                                "remove_unused_columns": False, "dataloader_num_workers": 0, "disable_tqdm": True,
                                "generation_config": {"max_new_tokens": 4}, **training}}
    if peft is not None:
        config["peft_config"] = peft
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return str(path)


GLM4_LORA = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
             "target_modules": ["q_proj", "k_proj", "v_proj"]}
GLM4_PTUNING = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
                "num_attention_heads": 2, "token_dim": 32}


@pytest.mark.slow
def test_glm4_qlora_lora_trains_resumes_and_infers(glm4_data, tmp_path):
    from glm4_finetune.finetune import finetune
    from glm4_finetune.inference import generate_reply, load_for_inference

    out = tmp_path / "lora"
    trainer = finetune(glm4_data, GLM4, glm4_config(tmp_path / "lora.yaml", out, GLM4_LORA))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert packed_base(trainer.model) == fresh_packed_base(GLM4, dtype="fp32")
    assert_trained_adapter(adapter(out / "checkpoint-1"), adapter(out))
    resumed = finetune(glm4_data, GLM4, glm4_config(tmp_path / "lora.yaml", out, GLM4_LORA), "1")
    assert [e["loss"] for e in resumed.state.log_history if "loss" in e] == losses
    assert all(torch.equal(v, adapter(out)[k]) for k, v in adapter(out / "checkpoint-2").items())

    assert_loads_on_full_precision_base(GLM4, out, torch.tensor([[151331, 151333, 151336, 198, 100, 200]]))
    model, tokenizer = load_for_inference(str(out), base_model=GLM4, quantization_bit=4)
    reply, _, _ = generate_reply(model, tokenizer, [{"role": "user", "content": "#裙子#夏天"}], max_new_tokens=3,
                                 do_sample=False)
    assert reply["role"] == "assistant"


@pytest.mark.slow
def test_glm4_qlora_ptuning_v2_trains(glm4_data, tmp_path):
    from glm4_finetune.finetune import finetune

    out = tmp_path / "ptuning"
    trainer = finetune(glm4_data, GLM4, glm4_config(tmp_path / "p.yaml", out, GLM4_PTUNING, learning_rate=0.3))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert packed_base(trainer.model) == fresh_packed_base(GLM4, dtype="fp32")
    assert_trained_adapter(adapter(out / "checkpoint-1"), adapter(out))


@pytest.mark.parametrize("peft, training, bits, message", [
    (None, {}, 4, "quantization_bit: full fine-tuning cannot train 4-bit base weights; use LoRA or P-tuning v2 on "
                  "the quantized base, or drop quantization_bit"),
    (GLM4_LORA, {"deepspeed": os.path.join(REPO, "glm4_finetune", "configs", "ds_zero_3.json")}, 8,
     "quantization_bit: 8-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; use a ZeRO-1/2 DeepSpeed "
     "config or drop quantization_bit"),
    (GLM4_LORA, {}, 5, "quantization_bit: expected 4, 8 or null, got 5"),
])
def test_glm4_config_refuses_what_a_quantized_base_cannot_train(tmp_path, peft, training, bits, message):
    from glm4_finetune.config import load_config

    path = glm4_config(tmp_path / "q.yaml", tmp_path / "out", peft, bits, **training)
    with pytest.raises(UserError) as error:
        load_config(path)
    line = next(i for i, text in enumerate(open(path, encoding="utf-8"), 1) if text.startswith("quantization_bit"))
    assert str(error.value) == f"{path}:{line}: {message}"

"""Nothing unsafe is loaded: every loader that can meet a pickled .bin/.pth/.pt reads it with
torch.load(weights_only=True) and refuses a crafted pickle that would run code, in one line, without running it
(a marker file the payload would create must not appear): the model loader, a LoRA adapter at inference, the
llama convert/merge and GLM-4 convert readers, and a Trainer resume. Remote code only runs when asked for."""
import json
import os
import shutil
import sys

import pytest
import torch

from model_hub.make_tiny import tiny_dir
from tuning.errors import UserError, run_main
from conftest import REPO



class Payload:
    """Unpickling this runs `touch MARKER`, unless the loader refuses it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def refusal(path):
    return (f"{path}: refused to load: a pickled file here holds code or objects (posix.system), not only tensors; "
            "files are read with torch.load(weights_only=True) only. Convert it to safetensors where you trust it")


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "the crafted pickle was executed"


def crafted(path, marker):
    torch.save({"weight": Payload(marker)}, path)
    return str(path)


def test_model_loader_refuses_a_crafted_pytorch_model_bin(tmp_path, marker):
    from model_hub.loader import load_model_and_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir("llama-7b"), folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    crafted(folder / "pytorch_model.bin", marker)
    with pytest.raises(UserError) as error:
        load_model_and_tokenizer(str(folder))
    assert str(error.value) == refusal(folder)


def test_inference_refuses_a_crafted_adapter_model_bin(tmp_path, marker, monkeypatch, capsys):
    from chatglm_lora import infer

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": ["query_key_value"]}))
    crafted(adapter / "adapter_model.bin", marker)
    monkeypatch.setattr(sys, "argv", ["infer.py", "--chatglm_path", "tiny:chatglm-6b", "--lora_path", str(adapter),
                                      "--data_path", os.path.join(REPO, "tests", "malformed", "alpaca_clean.json")])
    with pytest.raises(SystemExit) as exit_info:
        run_main(infer.main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + refusal(adapter)


def test_convert_and_merge_readers_refuse_crafted_shards(tmp_path, marker):
    from model_hub.shards import read_shard
    from model_hub.merge_llama_with_chinese_lora import read_adapter

    for name in ("consolidated.00.pth", "pytorch_model.bin"):
        path = crafted(tmp_path / name, marker)
        with pytest.raises(UserError) as error:
            read_shard(path)
        assert str(error.value) == refusal(path)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 32}))
    path = crafted(lora / "adapter_model.bin", marker)
    with pytest.raises(UserError) as error:
        read_adapter(str(lora))
    assert str(error.value) == refusal(path)


@pytest.mark.slow
def test_resume_refuses_a_crafted_checkpoint_file(tmp_path, marker, monkeypatch, capsys):
    """A checkpoint whose rng_state.pth was swapped for a crafted pickle (the Trainer's resume path)."""
    from chatglm_lora import finetune
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[5, 6, 130001, 130004, 7, 130005]] * 4, "seq_len": [4] * 4}).save_to_disk(
        str(tmp_path / "ds"))
    out = tmp_path / "run"

    def train(max_steps, *extra):
        monkeypatch.setattr(sys, "argv", [
            "finetune.py", "--dataset_path", str(tmp_path / "ds"), "--chatglm_path", "tiny:chatglm-6b",
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", str(max_steps),
            "--save_steps", "1", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", *extra])
        run_main(finetune.main)

    train(1)
    crafted(out / "checkpoint-1" / "rng_state.pth", marker)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(2, "--resume_from_checkpoint", "last")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + refusal(out / "checkpoint-1")


def test_remote_code_is_not_run_unless_asked(tmp_path):
    from model_hub.loader import load_model_and_tokenizer

    folder = tmp_path / "remote"
    shutil.copytree(tiny_dir("llama-7b"), folder)
    ran = tmp_path / "REMOTE_CODE_RAN"
    (folder / "configuration_evil.py").write_text(f"open({str(ran)!r}, 'w').close()\n"
                                                  "from transformers import PretrainedConfig\n"
                                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForCausalLM": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    from tuning.errors import UserError

    with pytest.raises(UserError, match="--trust_remote_code"):  # one line naming the flag (issue 25, item 1)
        load_model_and_tokenizer(str(folder))
    assert not ran.exists()


def test_deepspeed_checkpoints_are_read_weights_only(tmp_path, marker):
    """DeepSpeed's checkpoint reader (used when a DeepSpeed run resumes) inside
    tuning.checkpoints.deepspeed_reads_weights_only(): the DeepSpeed objects of a real ZeRO optimizer state load,
    a crafted pickle is refused; outside it, nothing of torch's settings is left changed."""
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from tuning.checkpoints import FORCE_WEIGHTS_ONLY, deepspeed_reads_weights_only

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "state": torch.ones(4)}
    torch.save(state, tmp_path / "optim_states.pt")
    with deepspeed_reads_weights_only():
        loaded = TorchCheckpointEngine().load(str(tmp_path / "optim_states.pt"))
        assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["state"], torch.ones(4))
        with pytest.raises(pickle.UnpicklingError):
            TorchCheckpointEngine().load(crafted(tmp_path / "evil_optim_states.pt", marker))
    # (torch's own defaults may grow meanwhile, as modules it registers lazily load: only ours must be gone)
    assert FORCE_WEIGHTS_ONLY not in os.environ
    assert not {LossScaler, ZeroStageEnum, fragment_address} & set(torch.serialization.get_safe_globals())

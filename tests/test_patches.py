"""Each third-party internal we rely on still exists, with the shape we rely on, in the installed versions (issue 30.5).

One test per patch in tuning/patches.py and model_hub/patches.py, per public mechanism whose exact behaviour we
rely on (torch's weights-only switch, transformers' adapter lookup, uvicorn's signal re-raise and protocol class),
and one per allowed hook in tests/private_internals.py. A library upgrade that moves one of them fails here, by
name, instead of somewhere deep in a training run. No training, no model weights."""
import importlib
import inspect
import io
import os
import pickle

import pytest
import torch

from private_internals import ALLOWED, ALSO_ON, _library_privates, _resolve


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def moved(what: str) -> str:
    return f"{what}: the installed library changed it; update the patch that relies on it (see its docstring)"


# ------------------------------------------------------------------------------------------------ tuning/patches.py

def test_forward_replaced_runs_on_the_instance_with_its_hooks():
    from tuning.patches import forward_replaced

    layer = torch.nn.Linear(3, 2)
    calls = []
    layer.register_forward_hook(lambda module, args, out: calls.append("hook"))
    with forward_replaced(layer, lambda x: torch.zeros(1)):
        assert torch.equal(layer(torch.ones(3)), torch.zeros(1)), moved("nn.Module.__call__ no longer reads "
                                                                         "self.forward at each call")
    assert "forward" not in vars(layer) and layer(torch.ones(3)).shape == (2,)
    assert calls == ["hook", "hook"], moved("forward hooks around an instance forward")


def test_open_progress_bars_are_listed():
    from tqdm import tqdm

    from tuning.patches import open_progress_bars

    assert hasattr(tqdm, "_instances"), moved("tqdm.tqdm._instances")
    bar = tqdm(total=2, file=io.StringIO())
    assert bar in open_progress_bars()
    bar.close()
    assert bar not in open_progress_bars()


def test_hub_libraries_read_their_offline_constants(monkeypatch):
    import datasets.config
    import huggingface_hub
    import huggingface_hub.constants

    from tuning.patches import switch_loaded_hub_libraries_offline

    for module, name in ((huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (datasets.config, "HF_DATASETS_OFFLINE")):
        assert hasattr(module, name), moved(f"{module.__name__}.{name}")
        monkeypatch.setattr(module, name, False)
    assert not huggingface_hub.is_offline_mode(), moved("huggingface_hub.is_offline_mode() reads constants")
    switch_loaded_hub_libraries_offline()
    assert huggingface_hub.is_offline_mode() and datasets.config.HF_DATASETS_OFFLINE


def test_accelerate_state_internals_are_there():
    from accelerate.state import AcceleratorState, PartialState

    assert "_shared_state" in vars(PartialState), moved("accelerate PartialState._shared_state")
    assert "reset_partial_state" in params(AcceleratorState._reset_state), moved("AcceleratorState._reset_state")
    training_args = inspect.getsource(importlib.import_module("transformers.training_args"))
    assert "AcceleratorState._reset_state(reset_partial_state=True)" in training_args, \
        moved("transformers' TrainingArguments no longer resets accelerate's state this way")


def test_the_trainer_saves_checkpoints_through_the_two_hooked_methods():
    from transformers import Seq2SeqTrainer, Trainer

    assert params(Trainer._save_checkpoint) == ["self", "model", "trial"], moved("Trainer._save_checkpoint")
    assert params(Trainer._get_output_dir) == ["self", "trial"], moved("Trainer._get_output_dir")
    assert "self._get_output_dir(" in inspect.getsource(Trainer._save_checkpoint), \
        moved("Trainer._save_checkpoint no longer asks _get_output_dir where to write")
    assert "self._save_checkpoint(" in inspect.getsource(Trainer), moved("Trainer no longer calls _save_checkpoint")
    assert Seq2SeqTrainer._save_checkpoint is Trainer._save_checkpoint


def test_trl_trainers_save_checkpoints_through_the_trainer():
    """TRL 1.16 writes a model card first, then hands the checkpoint to the Trainer's own save."""
    from transformers import Trainer
    from trl import DPOTrainer, KTOTrainer

    for trainer in (DPOTrainer, KTOTrainer):
        assert "super()._save_checkpoint(model, trial)" in inspect.getsource(trainer._save_checkpoint), \
            moved(f"{trainer.__name__}._save_checkpoint")
        assert trainer._get_output_dir is Trainer._get_output_dir, moved(f"{trainer.__name__}._get_output_dir")


def test_the_fused_lm_head_projects_only_the_scored_positions_on_a_cpu(monkeypatch):
    """TRL's fused forward still chooses `compact` through trl.trainer.utils' `_use_triton`; after the patch a CPU
    run sends only the scored positions through the projection, with the same log-probs, and the kernel module
    itself still runs its torch fallback."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as fused
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuning.patches import fused_lm_head_scores_answer_positions_only_on_cpu

    assert "compact = _use_triton(" in inspect.getsource(fused.add_fused_lm_head), moved(
        "trl.trainer.utils.add_fused_lm_head's compact choice")
    monkeypatch.setattr(fused, "_use_triton", fused._use_triton)  # restored after the test
    rows = []
    apply = fused._ChunkedLogProbFunction.apply
    monkeypatch.setattr(fused._ChunkedLogProbFunction, "apply",
                        lambda hidden, *rest: rows.append(hidden.shape[0]) or apply(hidden, *rest))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    fused.add_fused_lm_head(model)
    ids = torch.randint(0, 300, (2, 12))
    labels = ids.masked_fill(torch.arange(12) < 9, -100)  # a 9-token prompt, a 3-token answer
    with torch.no_grad():
        every = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        fused_lm_head_scores_answer_positions_only_on_cpu()
        fused_lm_head_scores_answer_positions_only_on_cpu()  # once is enough: not wrapped twice
        scored = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert rows == [2 * 11, 2 * 3], rows
    assert torch.equal(scored, every) and bool((scored[:, 8:] != 0).all())
    assert not kernel._use_triton(torch.device("cpu"))


# ------------------------------------------------------------------ public mechanisms whose exact behaviour we need

class Anything:
    pass


def test_torch_forces_weights_only_over_an_explicit_false(tmp_path, monkeypatch):
    """tuning.checkpoints.deepspeed_reads_weights_only: DeepSpeed passes weights_only=False itself."""
    torch.save({"x": Anything()}, tmp_path / "state.pt")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "state.pt", weights_only=False)
    with torch.serialization.safe_globals([Anything]):
        assert isinstance(torch.load(tmp_path / "state.pt", weights_only=False)["x"], Anything)


def test_the_adapter_lookup_honours_its_subfolder(tmp_path):
    """model_hub.loader.NO_ADAPTER_LOOKUP: from_pretrained's adapter_kwargs reach find_adapter_config_file."""
    from transformers.utils.peft_utils import find_adapter_config_file

    from model_hub.loader import NO_ADAPTER_LOOKUP

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter_config.json").write_text("{}")
    assert find_adapter_config_file(str(tmp_path)) is not None
    assert find_adapter_config_file(str(tmp_path), **NO_ADAPTER_LOOKUP) is None, moved("find_adapter_config_file")
    sources = [inspect.getsource(importlib.import_module(m)) for m in
               ("transformers.models.auto.auto_factory", "transformers.modeling_utils")]
    assert all("adapter_kwargs" in source for source in sources), moved("from_pretrained's adapter_kwargs")


def test_uvicorn_raises_the_stop_signal_again_for_the_handler_before_it():
    """serving.api.stop_signals_handled_by: the handler installed before Server.run is the one that gets it."""
    import uvicorn

    source = inspect.getsource(uvicorn.Server.capture_signals)
    assert "signal.signal(sig, self.handle_exit)" in source and "signal.signal(sig, handler)" in source, \
        moved("uvicorn.Server.capture_signals")
    assert "raise_signal" in source, moved("uvicorn re-raising the stop signal")
    assert params(uvicorn.Server.handle_exit) == ["self", "sig", "frame"], moved("uvicorn.Server.handle_exit")


def test_the_guarded_protocol_finds_what_it_uses_on_h11protocol():
    """serving.connection_guard subclasses uvicorn 0.54's H11Protocol (uvicorn's `http=` setting takes a class)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    init = inspect.getsource(H11Protocol.__init__)
    for name in ("self.connections", "self.cycle", "self.loop"):
        assert name in init, moved(f"H11Protocol {name}")
    assert "self.transport" in inspect.getsource(H11Protocol.connection_made), moved("H11Protocol.transport")
    assert "response_complete" in inspect.getsource(importlib.import_module("uvicorn.protocols.http.h11_impl"))


# -------------------------------------------------------------------------------------------- model_hub/patches.py

def test_transformers_is_loaded_by_a_loader_the_import_hook_can_wrap():
    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"), \
        moved("transformers is no longer loaded by a loader with exec_module (model_hub.patches)")


def test_the_register_api_takes_exist_ok():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for auto in (AutoConfig, AutoModelForCausalLM, AutoTokenizer):
        assert "exist_ok" in params(auto.register), moved(f"{auto.__name__}.register")


def test_the_hook_calls_back_after_the_import_once(tmp_path, monkeypatch):
    """The finder with a stand-in package: the callback runs once the import of transformers has finished, or the
    outermost module of ours that imports it is complete; then the finder is gone."""
    import sys

    from model_hub.patches import _AfterTransformersImport

    (tmp_path / "standin").mkdir()
    (tmp_path / "standin" / "__init__.py").write_text("")
    (tmp_path / "standin" / "outer.py").write_text("import standin_library\nimport standin.inner\nREADY = True\n")
    (tmp_path / "standin" / "inner.py").write_text("")
    (tmp_path / "standin_library.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []
    finder = _AfterTransformersImport(lambda: calls.append(sys.modules["standin.outer"].READY), "standin",
                                      library="standin_library")
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        importlib.import_module("standin.outer")
        assert calls == [True] and finder not in sys.meta_path
    finally:
        for name in [n for n in sys.modules if n.startswith("standin")]:
            del sys.modules[name]


# ----------------------------------------------------------------------- hooks allowed outside the patches modules

ALLOWED_INTERNALS = sorted({(name, owner) for names in ALLOWED.values() for name, (owner, _) in names.items()} |
                           {(name, owner) for (_, name), owners in ALSO_ON.items() for owner in owners})


@pytest.mark.parametrize("name, owner", ALLOWED_INTERNALS, ids=[f"{o.split(':')[1]}.{n}" for n, o in ALLOWED_INTERNALS])
def test_an_allowed_hook_still_exists(name, owner):
    assert name in _library_privates(_resolve(owner)), moved(f"{owner}.{name}")

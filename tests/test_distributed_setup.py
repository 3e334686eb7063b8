"""tuning/distributed.py without launching processes: launcher environment, threads per rank, ZeRO stages of the
shipped configs, the deepspeed launcher's --local_rank, and the one-line refusals (fast)."""
import os

import pytest
import torch

from tuning import distributed
from tuning.errors import UserError
from conftest import REPO

pytestmark = pytest.mark.distributed

CONFIGS = os.path.join(REPO, "glm4_finetune", "configs")


def test_rank_and_world_from_either_launcher(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.launched()) == (
        0, 1, True, False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name; torchrun's is LOCAL_WORLD_SIZE
    assert (distributed.rank(), distributed.world_size(), distributed.local_world_size()) == (3, 4, 2)
    assert distributed.launched() and not distributed.is_main()
    assert distributed.local_device() == torch.device("cpu") and distributed.backend() == "gloo"


def test_threads_are_shared_among_the_ranks_of_a_machine(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert distributed.limit_threads() == max(1, (os.cpu_count() or 1) // 2) == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert distributed.limit_threads() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_zero_stages_and_local_rank_argument(tmp_path):
    assert [distributed.zero_stage(os.path.join(CONFIGS, name)) for name in
            ("ds_zero_2.json", "ds_zero_2_offload.json", "ds_zero_3.json")] == [2, 2, 3]
    assert distributed.zero_stage(os.path.join(REPO, "llama_ner", "deepspeed.json")) == 1
    assert distributed.zero_stage(None) == 0 and distributed.zero_stage({"zero_optimization": {"stage": 3}}) == 3
    with pytest.raises(UserError, match="DeepSpeed config not found"):
        distributed.zero_stage(str(tmp_path / "missing.json"))
    argv = ["finetune.py", "--local_rank=1", "data", "--local-rank=0", "model"]
    distributed.drop_local_rank_argument(argv)
    assert argv == ["finetune.py", "data", "model"]


def test_plain_cpu_run_gets_use_cpu_and_no_process_group(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    threads = torch.get_num_threads()
    try:
        assert distributed.trainer_arguments({"output_dir": "x"}) == {"output_dir": "x", "use_cpu": True}
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert distributed.trainer_arguments({"output_dir": "x"})["ddp_backend"] == "gloo"
        assert not torch.distributed.is_initialized()
    finally:
        torch.set_num_threads(threads)

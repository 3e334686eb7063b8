"""bench/gpu_check.py, the one GPU check (issue 35), as far as a CPU can take it: the whole --dry_run (tiny models,
every section, serving included), a forced failure recorded while the other sections run, one-line argument
errors, the real-size models built on the meta device (no memory) with the estimator's exact parameter counts,
the card table, the datasets-free tokenisation against the recipe's own, and the wheel list."""
import json
import os
from unittest import mock

import pytest
import torch

from bench import gpu_check
from bench import gpu_check_support as support

TRAINING = ("chatglm_lora", "llama_ner_lora", "glm4_lora", "glm4_ptuning", "qlora")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    report = gpu_check.main(["--dry_run", "--out_dir", str(out)])
    return report, out


def test_dry_run_measures_every_section(dry_run):
    report, out = dry_run
    assert list(report["sections"]) == list(gpu_check.SECTION_NAMES)
    for name in TRAINING:
        section = report["sections"][name]
        assert section["status"] == "ok", section.get("traceback_tail")
        assert section["steps"] == 3 and section["timed_steps"] == 2
        assert section["tokens_per_s"] > 0 and section["mfu_pct"] > 0 and section["peak_rss_mib_process"] > 0
        # the estimator's figure for the settings that ran: the measured batch and padded length
        assert section["estimate_mib"] > 600  # 600 MiB is its CUDA context alone
        assert section["estimate_settings"]["batch_size"] == section["batch_size"] == 2
        assert section["estimate_settings"]["seq_len"] == section["seq_len"]
    assert report["sections"]["qlora"]["quantized_linear_layers"] > 0  # bitsandbytes is in the test venv
    assert report["sections"]["qlora"]["estimate_settings"]["quantization_bit"] == 4
    assert report["sections"]["glm4_ptuning"]["estimate_settings"]["method"] == "ptuning_v2"
    serving = report["sections"]["serving"]
    assert serving["status"] == "ok", serving.get("traceback_tail")
    assert serving["decode_tok_s_batch1"] > 0 and serving["decode_tok_s_batch8"] > 0 and serving["ttft_ms"] > 0
    assert serving["hbm_limit_reason"]  # no bandwidth on file for a CPU: said, not invented
    assert report["versions"]["torch"] == torch.__version__
    with open(out / "gpu_check.json", encoding="utf-8") as f:
        assert json.load(f)["sections"].keys() == report["sections"].keys()
    table = (out / "gpu_check.md").read_text(encoding="utf-8")
    assert all(f"| {name} | ok |" in table for name in gpu_check.SECTION_NAMES)


def test_a_failing_section_is_recorded_and_the_rest_still_runs(tmp_path):
    report = gpu_check.main(["--dry_run", "--only", "serving,chatglm_lora", "--fail_section", "serving",
                             "--out_dir", str(tmp_path)])
    failed, ran = report["sections"]["serving"], report["sections"]["chatglm_lora"]
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "RuntimeError" and "forced failure" in failed["error"]["message"]
    assert ran["status"] == "ok" and ran["tokens_per_s"] > 0 and ran["estimate_mib"] > 0
    assert "| serving | failed | RuntimeError: forced failure" in (tmp_path / "gpu_check.md").read_text("utf-8")


@pytest.mark.parametrize("argv, words", [(["--only", "nope"], "unknown section 'nope'"),
                                         (["--steps", "1"], "at least 2"),
                                         (["--time_budget_s", "0"], "must be positive")])
def test_bad_arguments_are_one_line_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(["--dry_run", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["chatglm-6b", "chinese-alpaca-7b", "glm-4-9b-chat"])
def test_real_configs_build_in_bf16_on_the_device_asked(name):
    from model_hub.estimate_memory import count_parameters, load_arch

    model, _ = support.build_model(name, torch.device("meta"), real=True)  # meta: the sizes, no memory
    tensors = list(model.parameters()) + list(model.buffers())
    assert {t.device.type for t in tensors} == {"meta"}  # nothing made on the CPU first
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == count_parameters(load_arch(name)[0])["total"]


@pytest.mark.parametrize("device_name, card, bandwidth", [("NVIDIA H100 80GB HBM3", "H100 SXM", 3.35e12),
                                                          ("NVIDIA H200", "H200", 4.8e12),
                                                          ("NVIDIA A10G", None, None)])
def test_card_peaks_by_device_name(device_name, card, bandwidth):
    with mock.patch.object(torch.cuda, "get_device_name", return_value=device_name):
        info = support.card_info(torch.device("cuda"))
    assert info["hbm_bytes_per_s"] == bandwidth
    if card:
        assert info["card"] == card and info["peak_flops"] == 989e12
    else:  # unknown card: no MFU, and the reason names the card
        assert info["peak_flops"] is None and device_name in info["peak_reason"]


def test_tokenisation_without_datasets_matches_the_recipes():
    from glm4_finetune.config import load_config
    from glm4_finetune.trainer import tokenize_split
    from model_hub.glm4.tokenizer import load_glm4_tokenizer

    cfg = load_config(os.path.join(gpu_check.REPO, "glm4_finetune", "configs", "lora.yaml"))
    cfg.max_input_length, cfg.max_output_length = 8, 8  # the second row's answer is cut away: dropped by both
    rows = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}],
            [{"role": "user", "content": "北京是中国的首都。" * 4}, {"role": "assistant", "content": "是的。"}]]
    tokenizer = load_glm4_tokenizer()
    ours = support.tokenize_split_without_datasets(rows, "train", tokenizer, cfg)
    theirs = tokenize_split(rows, "train", tokenizer, cfg)
    assert len(ours) == 1 and list(ours) == [dict(row) for row in theirs]
    assert ours["input_ids"] == theirs["input_ids"]


def test_installed_packages_are_not_installed_again(tmp_path):
    (tmp_path / "typer-0.29.2-py3-none-any.whl").write_bytes(b"")  # installed here: pip must not be called
    with mock.patch("subprocess.run", side_effect=AssertionError("pip called")):
        assert gpu_check.install_missing_wheels(str(tmp_path)) == []


def test_wheels_are_what_the_image_lacks():
    from bench import gpu_wheels

    wanted = gpu_wheels.wanted()
    assert "typer" in wanted  # glm4_finetune/finetune.py's command line
    assert not {"torch", "transformers", "peft", "typing-extensions"} & set(wanted)

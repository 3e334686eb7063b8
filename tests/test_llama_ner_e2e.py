"""llama_ner end to end on the tiny Chinese-Alpaca (real tokenizer, random weights) and real MSRA rows:
Trainer LoRA training (loss falls, adapter reloads with identical logits, resume is exact), the F1 report of
test.py, predict.py's printout, chat_ner.py, the raw DeepSpeed loop under torchrun, and one-line errors."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from llama_ner import chat_ner, predict, train_deepspeed, train_trainer
from llama_ner import test as ner_test
from llama_ner.process import process_msra
from folder_state import snapshot
from model_hub.make_tiny import tiny_dir
from test_crash_safety import limit_file_size  # a file-size limit for a child process
from tuning.errors import run_main
from conftest import REPO, run_in_process

MODEL = "tiny:chinese-alpaca-7b"
TRAIN = ["--model_dir=" + MODEL, "--train_batch_size=2", "--max_steps=6", "--save_steps=3", "--log_steps=1",
         "--learning_rate=1e-2", "--save_total_limit=2", "--num_train_epochs=1"]


def run(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", *argv])
    return run_main(module.main)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 training rows (positives then negatives, as process.py's train mode) and small dev/test files."""
    root = tmp_path_factory.mktemp("ner_data")
    process_msra(os.path.join(REPO, "data", "llama_ner_msra", "ori_data", "msra_1000.txt"), str(root / "all.txt"))
    lines = (root / "all.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    (root / "train.txt").write_text("\n".join(lines[:30] + lines[-10:]), encoding="utf-8")
    (root / "dev.txt").write_text("\n".join(lines[:3] + lines[-2:]), encoding="utf-8")
    process_msra(os.path.join(REPO, "data", "msra_extra", "msra_test.txt"), str(root / "test_all.txt"))
    test_lines = (root / "test_all.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    (root / "test.txt").write_text("\n".join(test_lines[:3] + test_lines[-2:]), encoding="utf-8")
    tiny_dir("chinese-alpaca-7b")
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One uninterrupted 6-step run (checkpoints at 3 and 6); the trainer is kept for in-memory comparisons."""
    save_dir = tmp_path_factory.mktemp("run") / "full"
    mp = pytest.MonkeyPatch()
    try:
        trainer = run(train_trainer, TRAIN + [f"--train_path={data / 'train.txt'}", f"--dev_path={data / 'dev.txt'}",
                                              f"--save_dir={save_dir}/"], mp)
    finally:
        mp.undo()
    return save_dir, trainer


def losses(save_dir, checkpoint):
    state = json.loads((save_dir / checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.slow
def test_trainer_trains_saves_and_reloads(trained, data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llama_ner.common import collate_for
    from llama_ner.dataset import load_data

    save_dir, trainer = trained
    adapter = save_dir / "adapter_model"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_args.json"} <= set(os.listdir(adapter))
    assert json.loads((adapter / "train_args.json").read_text())["max_steps"] == 6
    for step in (3, 6):  # real checkpoints: adapter + optimizer + scheduler + RNG + state
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= set(os.listdir(save_dir / f"checkpoint-{step}"))
    assert (save_dir / "loss.png").is_file()

    model = trainer.model.eval()
    batch = collate_for(_args(adapter), _tokenizer()).collate_fn(load_data(str(data / "train.txt"))[:4])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir("chinese-alpaca-7b"), dtype=torch.float32).eval()
    with torch.no_grad():
        base_loss = base(**batch).loss.item()
        trained_logits = model(input_ids=batch["input_ids"]).logits
        trained_loss = model(**batch).loss.item()
        reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
        assert torch.equal(reloaded(input_ids=batch["input_ids"]).logits, trained_logits)
    assert trained_loss < base_loss - 0.1, (base_loss, trained_loss)  # the loss fell on training rows


def _args(adapter):
    return SimpleNamespace(**json.loads((adapter / "train_args.json").read_text()))


def _tokenizer():
    from model_hub.loader import load_tokenizer

    return load_tokenizer(MODEL)


@pytest.mark.slow
def test_resume_is_exact(trained, data, tmp_path, monkeypatch):
    save_dir, _ = trained
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(save_dir / "checkpoint-3", resumed / "checkpoint-3")
    run(train_trainer, TRAIN + [f"--train_path={data / 'train.txt'}", f"--save_dir={resumed}/",
                                "--resume_from_checkpoint=last"], monkeypatch)
    full, again = losses(save_dir, "checkpoint-6"), losses(resumed, "checkpoint-6")
    assert [again[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]
    a, b = adapter_tensors(save_dir / "adapter_model"), adapter_tensors(resumed / "adapter_model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(trained, data, tmp_path, monkeypatch, capsys):
    """Issue 23.2: the finished run's command again with --resume_from_checkpoint=last trained a 7th step, wrote
    checkpoint-7 and rotated checkpoint-3 away. Now it says so and changes nothing; a raised --max_steps trains
    exactly up to it."""
    save_dir, _ = trained
    run_dir = tmp_path / "finished"
    shutil.copytree(save_dir, run_dir)
    before = snapshot(run_dir)
    argv = TRAIN + [f"--train_path={data / 'train.txt'}", f"--dev_path={data / 'dev.txt'}", f"--save_dir={run_dir}/",
                    "--resume_from_checkpoint=last"]
    capsys.readouterr()
    assert run(train_trainer, argv, monkeypatch) is None
    assert f"{run_dir}/checkpoint-6 is already at step 6 (max_steps 6): nothing to train, nothing was changed; " \
           "raise --max_steps=N to train further" in capsys.readouterr().out
    assert snapshot(run_dir) == before

    run(train_trainer, argv + ["--max_steps=7"], monkeypatch)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    assert list(losses(run_dir, "checkpoint-7"))[-2:] == [6, 7]


@pytest.mark.slow
def test_dropout_masks_drawn_ahead_train_the_same_adapter(trained, data, tmp_path, monkeypatch):
    """--prefetch_dropout_masks=true (LoRA dropout masks on a helper thread): the uninterrupted run's losses at
    every step and its adapter, bit for bit."""
    save_dir, _ = trained
    ahead = tmp_path / "ahead"
    run(train_trainer, TRAIN + [f"--train_path={data / 'train.txt'}", f"--save_dir={ahead}/",
                                "--prefetch_dropout_masks=true"], monkeypatch)
    full, again = losses(save_dir, "checkpoint-6"), losses(ahead, "checkpoint-6")
    assert again == full and len(full) == 6
    a, b = adapter_tensors(save_dir / "adapter_model"), adapter_tensors(ahead / "adapter_model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_f1_report_and_predict(trained, data, tmp_path, monkeypatch, capsys):
    save_dir, _ = trained
    train_args = save_dir / "adapter_model" / "train_args.json"
    report_path = tmp_path / "report.json"
    report = run(ner_test, [f"--train_args={train_args}", f"--test_path={data / 'test.txt'}", "--max_new_tokens=8",
                            f"--report_path={report_path}", "--eval_batch_size=3"], monkeypatch)
    written = json.loads(report_path.read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(report, ensure_ascii=False))
    for split, rows in (("dev", 5), ("test", 5)):
        scores = written["splits"][split]["scores"]
        assert scores["n_sentences"] == rows and len(written["splits"][split]["predictions"]) == rows
        assert {"人名", "地名", "机构名"} <= set(scores["per_type"]) and 0.0 <= scores["micro"]["f1"] <= 1.0
    out = capsys.readouterr().out
    assert "预测：" in out and "真实：" in out and "micro" in out

    run(predict, [f"--train_args={train_args}", "--max_new_tokens=4"], monkeypatch)
    out = capsys.readouterr().out
    assert out.count("文本 >>> ") == 3 and out.count("真实 >>>  北京市_地名") == 1 and out.count("生成 >>> ") == 3


@pytest.mark.slow
def test_chat_ner_batch_file(trained, data, tmp_path, monkeypatch, capsys):
    save_dir, _ = trained
    monkeypatch.setitem(chat_ner.GENERATION_CONFIG, "max_new_tokens", 6)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    out_file = tmp_path / "predictions.json"
    rows = tmp_path / "rows.txt"
    rows.write_text("为什么要减少污染，保护环境？\n" + (data / "dev.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")[0],
                    encoding="utf-8")
    for flags in ([], ["--original_prompt"]):
        run(chat_ner, ["--base_model", MODEL, "--lora_model", str(save_dir / "adapter_model"), "--with_prompt",
                       "--only_cpu", "--seed", "1", "--data_file", str(rows), "--predictions_file", str(out_file),
                       *flags], monkeypatch)
        written = json.loads(out_file.read_text(encoding="utf-8"))
        assert [r["Input"][:6] for r in written] == ["为什么要减少", "你现在是一个"]
        assert (tmp_path / "generation_config.json").is_file()
    assert capsys.readouterr().out.count("=======1=======") == 2


@pytest.mark.slow
def test_chat_ner_interactive_ends_quietly_at_end_of_input(data, monkeypatch, capsys):
    """Issue 23.5: piped input (or Ctrl-D) without a final empty line ended in an EOFError traceback, exit 1."""
    import io

    monkeypatch.setitem(chat_ner.GENERATION_CONFIG, "max_new_tokens", 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # chat_ner sets it from --gpus; restored after the test
    monkeypatch.setattr(sys, "stdin", io.StringIO("北京是中国的首都\n"))
    assert run(chat_ner, ["--base_model", MODEL, "--with_prompt", "--only_cpu", "--seed", "1", "--interactive"],
               monkeypatch) is None
    out = capsys.readouterr().out
    assert out.count("Response: ") == 1 and out.rstrip().endswith("Input:")


@pytest.mark.slow
def test_raw_deepspeed_loop_trains_and_saves(data, tmp_path):
    save_dir = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    argv = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "1", "--master_port",
            "29613", os.path.join(REPO, "llama_ner", "train_deepspeed.py"), f"--model_dir={MODEL}",
            f"--train_path={data / 'train.txt'}", "--train_batch_size=2", "--gradient_accumulation_steps=2",
            "--max_steps=4", "--log_steps=2", "--save_steps=2", "--learning_rate=1e-2", f"--save_dir={save_dir}/"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [line for line in proc.stdout.splitlines() if line.startswith("loss:")]
    assert [line.split("global_step:")[1] for line in logged] == ["2/4", "4/4"]
    assert {"adapter_config.json", "adapter_model.safetensors", "train_args.json"} <= set(os.listdir(save_dir))
    b = [v for k, v in adapter_tensors(save_dir).items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # lora_B starts at zero: the optimizer really stepped

    # Issue 23.2: the same command resumed says the run is finished and changes nothing (not even train_args.json).
    # It stops before any work, so it runs in this process (issue 32), under the variables torchrun sets.
    before = snapshot(save_dir)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            patch.setenv(name, value)
        code, stdout, stderr = run_in_process(train_deepspeed.main, [*argv[6:-1], "--resume_from_checkpoint=last",
                                                                     argv[-1]], script="llama_ner/train_deepspeed.py")
    assert code == 0, stderr[-3000:]
    assert f"{save_dir}/checkpoints/global_step4 is already at step 4 (max_steps 4): nothing to train" in stdout
    assert snapshot(save_dir) == before

    # Resumed under a file-size limit, the save of global_step6 fails (model states ~92 kB): one line, the partial
    # write is gone, and global_step4 stays what resume picks, byte for byte.
    good = {f.name: f.read_bytes() for f in (save_dir / "checkpoints" / "global_step4").iterdir()}
    proc = subprocess.run([*argv[:-1], "--max_steps=6", "--resume_from_checkpoint=last", argv[-1]],
                          capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=lambda: limit_file_size(80_000))
    assert proc.returncode != 0
    assert f"error: saving global_step6 failed (a file write failed: disk full or over a file-size limit); nothing " \
           f"of it was kept. {save_dir}/checkpoints/global_step4 is the last good checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: saving")[0]
    assert sorted(os.listdir(save_dir / "checkpoints")) == ["global_step4", "latest"]
    assert (save_dir / "checkpoints" / "latest").read_text() == "global_step4"
    assert {f.name: f.read_bytes() for f in (save_dir / "checkpoints" / "global_step4").iterdir()} == good


@pytest.mark.parametrize("content, expected", [
    ('{"instruct": "i", "query": "q", "answer": "没有"}\n{"instruct": "i", "query": "q"}', ":2: answer: missing field"),
    ('{"instruct": "i", "query": "q", "answer": ""}', ":1: answer: empty answer"),
])
def test_bad_training_data_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, content, expected):
    bad = tmp_path / "train.txt"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        run(train_trainer, [f"--train_path={bad}", f"--save_dir={tmp_path}/run/", "--model_dir=" + MODEL],
            monkeypatch)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {bad}{expected}")
    assert err.strip().count("\n") == 0
    assert not (tmp_path / "run").exists()


def test_unknown_key_and_help(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(train_trainer, ["--no_such_key=1"], monkeypatch)
    assert exit_info.value.code == 2 and "参数【no_such_key】不在配置中，请检查！" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run(train_trainer, ["--help"], monkeypatch)
    assert exit_info.value.code == 0 and "--deepspeed_jaon_path" in capsys.readouterr().out


def test_raw_loop_help_names_its_adapter_folder(monkeypatch, capsys):
    """Issue 23: train_deepspeed.py --help said the adapter goes to save_dir/adapter_model; it goes to save_dir."""
    from llama_ner import train_deepspeed

    with pytest.raises(SystemExit) as exit_info:
        run(train_deepspeed, ["--help"], monkeypatch)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--save_dir"))
    assert exit_info.value.code == 0 and line.endswith(
        "the adapter and train_args.json go here; DeepSpeed checkpoints in save_dir/checkpoints/global_stepN")


def test_batched_left_padded_generation_equals_one_by_one(data):
    from transformers import AutoModelForCausalLM

    from llama_ner.common import collate_for
    from llama_ner.dataset import load_data
    from model_hub.loader import load_tokenizer
    from tuning.generation import generate_batched

    tokenizer = load_tokenizer(MODEL)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("chinese-alpaca-7b"), dtype=torch.float32)
    collate = collate_for(SimpleNamespace(instruct_column="instruct", query_column="query",
                                          response_column="answer", max_seq_length=192), tokenizer)
    prompts = [collate.prompt_ids(r) for r in load_data(str(data / "dev.txt"))]
    assert len({len(p) for p in prompts}) > 1  # different lengths: real left padding
    kwargs = dict(pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id], max_new_tokens=6,
                  do_sample=False, show_progress=False)
    batched = generate_batched(model, prompts, batch_size=len(prompts), **kwargs)
    single = [generate_batched(model, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == single and all(len(x) == 6 for x in single)



def test_generation_head_as_tall_matmul_gives_the_same_logits_and_tokens():
    """generate_batched computes the fp32 CPU vocab projection as weight @ hidden.T (a faster kernel for a few
    rows): batch 1 bit-identical to nn.Linear, batch 8 within rounding, same greedy tokens; the head is restored."""
    from transformers import AutoModelForCausalLM

    from tuning.generation import cut_at_stop, generate_batched, left_pad, vocab_projection_as_tall_matmul

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("chinese-alpaca-7b"), dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    hidden = torch.randn(8, 1, head.in_features, generator=torch.Generator().manual_seed(0))
    plain = head(hidden)
    with vocab_projection_as_tall_matmul(model):
        assert "forward" in vars(head)
        tall = head(hidden)
        assert torch.equal(head(hidden[:1]), torch.nn.functional.linear(hidden[:1], head.weight))
    assert "forward" not in vars(head) and torch.equal(head(hidden), plain)
    assert tall.shape == plain.shape and tall.is_contiguous()
    torch.testing.assert_close(tall, plain, rtol=1e-5, atol=1e-5)

    prompts = [[1, 5, 9, 300, 17], [1, 42, 7], [1, 8, 8, 8, 8, 8, 2000]]  # sorted by length inside: 3, 5, 7
    with_tall = generate_batched(model, prompts, pad_id=0, stop_ids=[2], batch_size=3, max_new_tokens=5,
                                 do_sample=False, show_progress=False)
    ids, mask = left_pad(sorted(prompts, key=len), 0)
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=[2], max_new_tokens=5,
                         do_sample=False)  # the same batch through plain nn.Linear
    plain_tokens = [cut_at_stop(row[ids.shape[1]:].tolist(), {2}) for row in out]
    assert with_tall == [plain_tokens[i] for i in (1, 0, 2)] and any(with_tall)

@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_under_the_deepspeed_launcher(data, tmp_path):
    """The README's `deepspeed train_trainer.py`: DeepSpeed (ZeRO-1 from deepspeed.json) inside the Trainer."""
    save_dir = tmp_path / "ds_trainer"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "1", "--master_port", "29614",
         os.path.join(REPO, "llama_ner", "train_trainer.py"), f"--model_dir={MODEL}",
         f"--train_path={data / 'train.txt'}", "--train_batch_size=2", "--gradient_accumulation_steps=2",
         "--max_steps=2", "--log_steps=1", "--save_steps=2", "--learning_rate=1e-2", f"--save_dir={save_dir}/"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((save_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    assert (save_dir / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own optimizer state
    assert (save_dir / "adapter_model" / "adapter_model.safetensors").is_file()
    assert json.loads((save_dir / "adapter_model" / "train_args.json").read_text())["local_rank"] == 0

    # Issue 23.3: resumed by plain `python`, the Trainer silently restarted DeepSpeed's optimizer and lr schedule
    # (lr back to its peak at step 4). It is refused in one line before anything is loaded or written.
    before = snapshot(save_dir)
    code, _, stderr = run_in_process(train_trainer.main, [  # refused before any work: in this process (issue 32)
        f"--model_dir={MODEL}", f"--train_path={data / 'train.txt'}", "--train_batch_size=2", "--max_steps=4",
        "--save_steps=2", "--resume_from_checkpoint=last", f"--save_dir={save_dir}/"], script="llama_ner/train_trainer.py")
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: {save_dir}/checkpoint-2: resume_from_checkpoint: written under DeepSpeed (its optimizer and scheduler "
        "state are in global_stepN/, which only DeepSpeed reads); to resume it exactly, relaunch with `deepspeed "
        "llama_ner/train_trainer.py …`")
    assert snapshot(save_dir) == before

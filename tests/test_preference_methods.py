"""Preference training methods beyond DPO-with-LoRA (preference/, issue 34) on tiny models: the reference-free ORPO and
SimPO raise the chosen-over-rejected gap, QLoRA 4-bit trains the adapter over untouched nf4 weights, full fine-tuning
keeps a frozen copy of the start weights as the DPO reference, ChatGLM-6B (ChatGLM-Tuning's prompt) gets its SFT rows
and trains, KTO trains on unpaired rows, and bad flags are one line with exit code 2."""
import json
import lzma
import os

import pytest
import torch

from conftest import REPO, run_in_process
from test_preference import collated, pairs, scored, sequence_logps  # noqa: F401  (pairs: module fixture)

from preference import train_dpo
from preference.pairs import AnswerEncoder, tokenize_file

LLAMA, CHATGLM = "tiny:chinese-alpaca-7b", "tiny:chatglm-6b"
FEW_STEPS = ["--train_batch_size", "4", "--max_length", "256", "--log_steps", "1", "--save_steps", "100"]


def train(pairs_path, out, *flags, model=LLAMA, prompt_format="llama_ner"):
    return train_dpo.main(["--model_dir", model, "--prompt_format", prompt_format, "--train_path", str(pairs_path),
                           "--save_dir", str(out), *FEW_STEPS, *map(str, flags)])


def mean_logps(model, batch) -> torch.Tensor:
    """Per-token mean log p of each row's scored tokens: what ORPO's and SimPO's losses compare."""
    return sequence_logps(model, batch) / (scored(batch)[:, 1:] != -100).sum(dim=1)


@pytest.fixture(scope="module")
def ner(pairs):
    from model_hub.loader import load_adapted

    base, tokenizer = load_adapted(LLAMA)
    rows, _ = tokenize_file(pairs["ner"], AnswerEncoder("llama_ner", tokenizer), 256)
    return {"base": base, "tokenizer": tokenizer, "rows": rows, "path": pairs["ner"]}


@pytest.mark.parametrize("loss_type, flags", [("orpo", ["--beta", "1.0", "--learning_rate", "2e-2"]),
                                              ("simpo", ["--learning_rate", "1e-2"])])
def test_reference_free_losses_raise_the_chosen_over_rejected_gap(ner, tmp_path, loss_type, flags):
    """ORPO / SimPO from the base with a new LoRA, 4 steps on 8 MSRA pairs: no reference model, only the LoRA trains,
    the per-token log p(chosen) − log p(rejected) grows (on average, and on at least half the pairs: a random tiny
    model); the output is an adapter like DPO's."""
    trainer = train(ner["path"], tmp_path / "out", "--loss_type", loss_type, "--max_steps", "4", *flags)
    assert getattr(trainer, "ref_model", None) is None and set(trainer.model.peft_config) == {"default"}
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    batch, n = collated_pairs(ner["rows"]), len(ner["rows"])
    before, after = mean_logps(ner["base"], batch), mean_logps(trainer.model, batch)
    growth = (after[:n] - after[n:]) - (before[:n] - before[n:])
    assert growth.mean() > 0 and (growth > 0).float().mean() >= 0.5, growth
    logged = [e["rewards/margins"] for e in trainer.state.log_history if "rewards/margins" in e]
    assert len(logged) == 4 and all(map(torch.isfinite, torch.tensor(logged)))
    names = set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors", "prompt_format.json", "loss.png", "margins.png",
            "checkpoint-4"} <= names


def collated_pairs(rows):
    """The rows as the DPO path collates them: chosen rows then rejected rows, prompt tokens unscored."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0)([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                                      for r in rows])


def test_orpo_and_simpo_score_the_same_tokens_as_dpo(ner):
    """The experimental trainers' rows (preference.reference_free.pair_features): prompt + answer, labels only on the
    answer — exactly the tokens the DPO path scores."""
    from preference.reference_free import pair_features

    batch = collated_pairs(ner["rows"])
    labels, n = scored(batch), len(ner["rows"])
    for i, row in enumerate(ner["rows"]):
        features = pair_features(row, 256)
        for half, side in ((0, "chosen"), (n, "rejected")):
            length = len(features[f"{side}_input_ids"])
            assert features[f"{side}_input_ids"] == batch["input_ids"][half + i][:length].tolist()
            assert features[f"{side}_labels"] == labels[half + i][:length].tolist()
    cut = pair_features(ner["rows"][0], len(ner["rows"][0]["prompt_ids"]) + 2)
    assert [t for t in cut["chosen_labels"] if t != -100] == ner["rows"][0]["chosen_ids"][:2]


@pytest.mark.parametrize("flags, message", [
    (["--loss_type", "cpo"], "error: loss_type: expected one of sigmoid, "),
    (["--finetuning_type", "freeze"], "error: finetuning_type: expected lora or full, got 'freeze'"),
    (["--finetuning_type", "full", "--quantization_bit", "4"], "error: quantization_bit: full fine-tuning cannot "
                                                                "train 4-bit base weights"),
    (["--quantization_bit", "3"], "error: quantization_bit: expected 4, 8 or nothing"),
    (["--loss_type", "simpo", "--simpo_gamma", "0"], "error: simpo_gamma: expected a positive number, got 0.0"),
])
def test_bad_method_flags_are_one_line_exit_2_before_loading(tmp_path, flags, message):
    out = tmp_path / "out"
    code, _, stderr = run_in_process(train_dpo.main, ["--model_dir", LLAMA, "--train_path", tmp_path / "none.jsonl",
                                                      "--save_dir", out, *flags])
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and stderr.startswith(message), stderr
    assert not out.exists()


def test_qlora_4bit_trains_the_adapter_over_unchanged_nf4_weights(ner, tmp_path, capsys):
    from test_qlora import fresh_packed_base, packed_base

    trainer = train(ner["path"], tmp_path / "out", "--quantization_bit", "4", "--max_steps", "1",
                    "--train_batch_size", "2", "--learning_rate", "2e-2")
    assert "base model: 4-bit NF4 weights (bitsandbytes, quantization_bit 4), frozen" in capsys.readouterr().out
    assert trainer.ref_model is None  # the reference is the quantized base, the adapter disabled
    assert packed_base(trainer.model) == fresh_packed_base(LLAMA)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in lora_b)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_full_fine_tuning_keeps_a_frozen_copy_of_the_start_weights_as_reference(ner, tmp_path):
    """--finetuning_type=full: every weight trains; the reference is a separate frozen model equal to the start
    weights (its log-probs = the base's); the result is a whole model folder that loads and carries its format."""
    from model_hub.loader import load_adapted
    from model_hub.prompt_format import read_prompt_format

    out = tmp_path / "full"
    trainer = train(ner["path"], out, "--finetuning_type", "full", "--max_steps", "2", "--learning_rate", "1e-3")
    reference, policy, base = trainer.ref_model, trainer.model, ner["base"].state_dict()
    assert reference is not None and reference is not policy and not hasattr(policy, "peft_config")
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(torch.equal(p, base[n]) for n, p in reference.state_dict().items())
    changed = [n for n, p in policy.state_dict().items() if not torch.equal(p, base[n])]
    assert any("embed_tokens" in n for n in changed) and any("layers.1.mlp" in n for n in changed)
    assert {"config.json", "model.safetensors", "tokenizer.model", "prompt_format.json"} <= set(os.listdir(out))
    assert read_prompt_format(str(out)) == "llama_ner"
    loaded, _ = load_adapted(str(out))
    batch = collated_pairs(ner["rows"][:2])
    assert torch.allclose(sequence_logps(loaded, batch), sequence_logps(policy, batch), atol=1e-4)


@pytest.fixture(scope="module")
def chatglm_pairs(tmp_path_factory):
    """4 alpaca instructions without input: chosen = the first sentence of its answer, rejected = that of another
    instruction's answer (an off-topic reply; rule-made, not a human preference)."""
    with lzma.open(os.path.join(REPO, "data", "stanford_alpaca", "alpaca_data.json.xz")) as f:
        examples = [e for e in json.load(f)[:12] if not e["input"]][:4]
    first = [e["output"].split(". ")[0].rstrip(".") + "." for e in examples]
    path = tmp_path_factory.mktemp("chatglm") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": e["instruction"], "chosen": first[i],
                                        "rejected": first[(i + 1) % len(first)]}) + "\n"
                            for i, e in enumerate(examples)), encoding="utf-8")
    return path


def test_chatglm6b_rows_are_chatglm_tuning_rows_and_dpo_trains(chatglm_pairs, tmp_path):
    """prompt + chosen = chatglm_lora's SFT row ("Instruction: …\\nAnswer: " [gMASK] <sop>, answer, <eop>); scored =
    its trained labels after the <sop> that ends the prompt; 2 DPO steps run through TRL's fused head."""
    from chatglm_lora.finetune import DataCollator
    from chatglm_lora.tokenize_dataset_rows import tokenize_rows
    from model_hub.chatglm6b.prompts import tuning_prompt

    trainer = train(chatglm_pairs, tmp_path / "out", "--max_steps", "2", "--train_batch_size", "2",
                    "--learning_rate", "1e-2", model=CHATGLM, prompt_format="chatglm_tuning")
    tokenizer = trainer.processing_class
    rows, _ = tokenize_file(str(chatglm_pairs), AnswerEncoder("chatglm_tuning", tokenizer), 256)
    batch, n = collated(trainer, rows), len(rows)
    labels = scored(batch)
    eop = tokenizer.convert_tokens_to_ids("<eop>")
    for i, record in enumerate(map(json.loads, open(chatglm_pairs, encoding="utf-8"))):
        for half, answer in ((0, record["chosen"]), (n, record["rejected"])):
            (ids, seq_len), = tokenize_rows(tokenizer, eop, [tuning_prompt(record["prompt"])], [answer], 10 ** 4)
            (_, sft_labels), = DataCollator.rows([{"input_ids": ids, "seq_len": seq_len}])
            assert batch["input_ids"][half + i][batch["attention_mask"][half + i] == 1].tolist() == ids
            trained = [t for t in sft_labels if t != -100]
            assert trained[0] == tokenizer.convert_tokens_to_ids("<sop>")
            assert [t for t in labels[half + i].tolist() if t != -100] == trained[1:]
    logged = [e for e in trainer.state.log_history if "rewards/margins" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)


def test_kto_trains_on_unpaired_rows(ner, tmp_path):
    """{"prompt", "completion", "label"}: the MSRA pairs split into desirable (gold) and undesirable rows; 2 KTO steps
    log finite losses and a KL estimate, and the result is an adapter."""
    records = [json.loads(line) for line in open(ner["path"], encoding="utf-8")][:4]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"},
                                       ensure_ascii=False) + "\n" for r in records for key in ("chosen", "rejected")),
                    encoding="utf-8")
    trainer = train(path, tmp_path / "out", "--loss_type", "kto", "--max_steps", "2", "--learning_rate", "1e-2")
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    assert any("kl" in key for e in logged for key in e), logged
    assert {"adapter_model.safetensors", "prompt_format.json"} <= set(os.listdir(tmp_path / "out"))


def test_ipo_is_its_own_loss_from_the_first_step(ner, tmp_path):
    """--loss_type=ipo reaches TRL: a new LoRA starts equal to its reference (B = 0), so the first loss is IPO's
    (0 - 1/(2·beta))² = 25 for beta 0.1 — DPO's would be log 2."""
    trainer = train(ner["path"], tmp_path / "out", "--loss_type", "ipo", "--beta", "0.1", "--max_steps", "1")
    first = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert abs(first - 25.0) < 1e-3, first


def test_a_non_finite_step_stops_training_and_keeps_the_last_good_checkpoint(ner, tmp_path):
    """The recipes' NaN guard in the preference step: a learning rate of 1e30 throws the LoRA weights far at step 1,
    step 2's gradients are not finite; training stops before the optimizer touches them (exit 1 under run_main),
    naming the step and the checkpoint that is still good."""
    from tuning.errors import TrainingStopped

    out = tmp_path / "out"
    with pytest.raises(TrainingStopped) as stopped:
        train(ner["path"], out, "--learning_rate", "1e30", "--max_steps", "3", "--save_steps", "1")
    assert str(stopped.value) == ("non-finite loss/gradients at step 2; lower the learning rate or check the data. "
                                  f"Weights were not updated; the last good checkpoint is {out}/checkpoint-1")
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1"]

"""GLM-4 finetune_demo data code against the original's outputs (tests/golden/glm4), plus our fixes."""
import copy
import json
import os

import pytest

from glm4_finetune.data import ASSISTANT, EOS_FOR_CHAT, process_batch, process_batch_eval

FUNCTIONS = {"process_batch": process_batch, "process_batch_eval": process_batch_eval}


@pytest.fixture(scope="module")
def golden(golden_dir):
    with open(os.path.join(golden_dir, "glm4", "glm4_finetune.json"), encoding="utf-8") as f:
        return json.load(f)


def direct_cases(golden):
    for entry in golden["direct"]:
        for index, expected in enumerate(entry["outputs"]):
            yield entry, index, expected


def run(entry, conversations, tokenizer):
    """The original's function; process_batch with the original's labels (train_first_answer_token=False)."""
    extra = {"train_first_answer_token": False} if entry["function"] == "process_batch" else {}
    return FUNCTIONS[entry["function"]]({"messages": conversations}, tokenizer, entry["max_input_length"],
                                        entry["max_output_length"], entry["combine"], **extra)


def test_chat_template_renders_like_the_original(golden, glm4_tokenizer):
    for conversation, rendered in zip(golden["conversations"], golden["rendered_chat_template"]):
        assert glm4_tokenizer.apply_chat_template(conversation, tokenize=False) == rendered


def test_original_is_reproduced_wherever_it_is_right(golden, glm4_tokenizer):
    checked = 0
    for entry, index, expected in direct_cases(golden):
        broken = "error" in expected or (entry["function"] == "process_batch_eval" and entry["combine"])
        if broken:
            continue
        assert run(entry, [golden["conversations"][index]], glm4_tokenizer) == expected, (entry["function"], index)
        checked += 1
    assert checked == 4 * 8 + 8 + 6  # train both modes and lengths, eval combine=False (2 original crashes)


def test_combine_eval_asks_for_the_answer_instead_of_feeding_it(golden, glm4_tokenizer):
    """The original's combine-mode eval put the gold answer + [gMASK] into input_ids. Ours: context +
    <|assistant|> in, "\\n" + answer + <|user|> out — the same pair the per-message mode gives."""
    per_message = {e["max_input_length"]: e for e in golden["direct"]
                   if e["function"] == "process_batch_eval" and not e["combine"]}
    for entry, index, original in direct_cases(golden):
        if entry["function"] != "process_batch_eval" or not entry["combine"]:
            continue
        ours = run(entry, [golden["conversations"][index]], glm4_tokenizer)
        (input_ids,), (output_ids,) = ours["input_ids"], ours["output_ids"]
        assert input_ids[-1] == ASSISTANT and len(input_ids) <= entry["max_input_length"] + 1
        # the original's input is our context followed by the answer; its output starts with <|assistant|>
        assert original["input_ids"][0][:len(input_ids)] == input_ids or len(input_ids) > entry["max_input_length"]
        assert original["output_ids"][0][1:] == output_ids[:len(original["output_ids"][0]) - 1]
        if entry["max_input_length"] == 512:
            last = per_message[512]["outputs"][index]
            assert (input_ids, output_ids) == (last["input_ids"][-1], last["output_ids"][-1])


def test_eval_that_reaches_max_input_length_early_gives_no_example(golden, glm4_tokenizer):
    """The original raised UnboundLocalError here and the whole map failed."""
    entry = next(e for e in golden["direct"] if e["function"] == "process_batch_eval" and not e["combine"]
                 and e["max_input_length"] == 24)
    for index in (3, 4):
        assert "error" in entry["outputs"][index]
        assert run(entry, [golden["conversations"][index]], glm4_tokenizer) == {"input_ids": [], "output_ids": []}


def test_none_filled_messages_from_datasets_work(golden, glm4_tokenizer):
    """datasets fills every key with None; the original then crashed in the template. Ours: same rows as the
    conversations written without the None keys (and equal to the original wherever it did not crash)."""
    for group in golden["via_datasets"]:
        loaded = group["messages_as_loaded_by_datasets"]
        clean = [golden["conversations"][i] for i in group["conversation_indices"]]
        for function, key in (("process_batch", "train"), ("process_batch_eval", "eval")):
            entry = dict(group, function=function)
            ours = run(entry, copy.deepcopy(loaded), glm4_tokenizer)
            expected_clean = run(entry, clean, glm4_tokenizer)
            assert ours == expected_clean
            original = group[key]
            if "error" not in original and not (key == "eval" and group["combine"]):
                assert ours == original


def test_no_assistant_message_is_a_clear_error(glm4_tokenizer):
    conversation = [{"role": "user", "content": "hi"}]
    for function in (process_batch, process_batch_eval):
        for combine in (True, False):
            with pytest.raises(ValueError, match="no assistant message"):
                function({"messages": [conversation]}, glm4_tokenizer, 512, 512, combine)


def test_labels_cover_answer_and_stop_token(glm4_tokenizer):
    conversation = [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                    {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]
    every = process_batch({"messages": [conversation]}, glm4_tokenizer, 512, 512, False)
    last = process_batch({"messages": [conversation]}, glm4_tokenizer, 512, 512, True)
    decode = lambda ids: glm4_tokenizer.decode([t for t in ids if t != -100])  # noqa: E731
    original = process_batch({"messages": [conversation]}, glm4_tokenizer, 512, 512, True,
                             train_first_answer_token=False)
    assert decode(every["labels"][0]) == "\nB<|user|>\nD<|user|>"
    assert decode(last["labels"][0]) == "\nD<|user|>"  # the last turn as the per-turn mode trains it
    assert decode(original["labels"][0]) == "D<|user|>"
    assert every["input_ids"][0][-1] == last["input_ids"][0][-1] == EOS_FOR_CHAT


def test_combine_trains_the_first_token_of_a_tool_calls_function_name(golden, glm4_tokenizer):
    """Issue 33.9: the original's combine labels start one token after <|assistant|>, so a tool call's function name
    ("get_weather\n{…}") was trained without its first token and the model never learned to open the call. Ours
    labels exactly that one token more; every other label is the original's (golden, compared exactly above)."""
    # the tool-call form GLM-4's template renders as "<|assistant|>get_weather\n{…}" (serving_support's fixture data)
    call = golden["conversations"][4][:-1] + [{"role": "assistant", "metadata": "get_weather",
                                                "content": '{"city": "上海"}'}]
    ours = process_batch({"messages": [call]}, glm4_tokenizer, 512, 512, True)
    original = process_batch({"messages": [call]}, glm4_tokenizer, 512, 512, True, train_first_answer_token=False)
    ids, labels, before = ours["input_ids"][0], ours["labels"][0], original["labels"][0]
    changed = [i for i, (a, b) in enumerate(zip(labels, before)) if a != b]
    assert len(changed) == 1 and ids[changed[0] - 1] == ASSISTANT and labels[changed[0]] == ids[changed[0]]
    assert glm4_tokenizer.decode([t for t in labels if t != -100]).startswith("get_weather\n")
    assert not glm4_tokenizer.decode([t for t in before if t != -100]).startswith("get_weather")


@pytest.mark.parametrize("combine", [True, False])
def test_finetune_tokenisation_equals_the_functions(golden, glm4_tokenizer, combine, capsys):
    """finetune.py's datasets path (tools, observations, multi-turn) gives exactly process_batch(_eval)'s rows,
    minus what it reports: rows cut before any label, turns past max_input_length."""
    from types import SimpleNamespace

    from glm4_finetune.trainer import tokenize_split

    conversations = golden["conversations"]
    cfg = SimpleNamespace(max_input_length=24, max_output_length=8, combine=combine, train_first_answer_token=True,
                          data_config=SimpleNamespace(num_proc=None))
    train = tokenize_split(conversations, "train", glm4_tokenizer, cfg)
    direct = process_batch({"messages": conversations}, glm4_tokenizer, 24, 8, combine)
    kept = [i for i, labels in enumerate(direct["labels"]) if any(t != -100 for t in labels)]
    assert train["input_ids"] == [direct["input_ids"][i] for i in kept]
    assert train["labels"] == [direct["labels"][i] for i in kept]
    evaluation = tokenize_split(conversations, "validation", glm4_tokenizer, cfg)
    rows = {"input_ids": [], "output_ids": []}
    for conversation in conversations:
        one = process_batch_eval({"messages": [conversation]}, glm4_tokenizer, 24, 8, combine)
        rows["input_ids"] += one["input_ids"]
        rows["output_ids"] += one["output_ids"]
    assert evaluation["input_ids"] == rows["input_ids"] and evaluation["output_ids"] == rows["output_ids"]
    printed = capsys.readouterr().out
    assert "train: 8 rows; " in printed and f"{8 - len(kept)} dropped because the cut removed every label" in printed


def test_the_shipped_advertisegen_folder_runs_the_original_command(monkeypatch):
    """Issue 23: `finetune.py data/glm4_finetune_demo/AdvertiseGen/ MODEL configs/lora.yaml` failed, as the folder
    had no train.jsonl. data/prepare.py makes it (a verified copy of the 3,000-row train sample xl.jsonl); every
    file the config names is then read and validated, and the run stops only at the (missing) model."""
    from data.prepare import ADVERTISEGEN, ADVERTISEGEN_TRAIN, main as prepare
    from glm4_finetune.finetune import finetune
    from tuning.errors import UserError

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prepare()
    with open(ADVERTISEGEN_TRAIN, "rb") as a, open(os.path.join(ADVERTISEGEN, "xl.jsonl"), "rb") as b:
        assert a.read() == b.read()
    monkeypatch.chdir(repo)
    with pytest.raises(UserError, match="^/nonexistent/model: model folder not found"):
        finetune(os.path.relpath(ADVERTISEGEN, repo), "/nonexistent/model", "glm4_finetune/configs/lora.yaml")

"""glm4_finetune/inference.py: the original's single prompt, and the interactive chat with history and tool calls."""
import sys

import pytest

from glm4_finetune import inference
from tuning.errors import run_main


def test_tool_call_text_becomes_metadata_and_renders_back(glm4_tokenizer):
    call = inference.reply_message('get_weather\n{"city": "上海"}')
    assert call == {"role": "assistant", "metadata": "get_weather", "content": '{"city": "上海"}'}
    assert inference.reply_message("\n你好。") == {"role": "assistant", "content": "你好。"}
    # the history renders exactly the tokens the model produced: <|assistant|>get_weather\n{...}
    rendered = glm4_tokenizer.apply_chat_template([{"role": "user", "content": "q"}, call], tokenize=False)
    assert rendered.endswith('<|assistant|>get_weather\n{"city": "上海"}')


def test_interactive_chat_keeps_history_and_shows_tool_calls(monkeypatch, capsys):
    replies = iter([
        ({"role": "assistant", "metadata": "get_weather", "content": '{"city": "上海"}'}, True, ""),
        ({"role": "assistant", "content": "上海 20 度。"}, False, ""),
        ({"role": "assistant", "content": "不客气。"}, False, ""),
    ])
    seen = []

    def fake_generate(model, tokenizer, messages, **sampling):
        seen.append([dict(m) for m in messages])
        return next(replies)

    monkeypatch.setattr(inference, "generate_reply", fake_generate)
    typed = iter(["上海天气？", '{"temp": 20}', "谢谢", "clear", ""])
    history = [{"role": "system", "content": "", "tools": []}]
    inference.chat(None, None, history, {}, read=lambda prompt: next(typed))
    out = capsys.readouterr().out
    assert '[tool call] get_weather {"city": "上海"}' in out and "GLM-4> 上海 20 度。" in out
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "observation"]
    assert seen[1][3]["content"] == '{"temp": 20}'
    assert [m["role"] for m in seen[2]] == ["system", "user", "assistant", "observation", "assistant", "user"]
    assert history == [{"role": "system", "content": "", "tools": []}]  # `clear`


def test_single_prompt_on_the_tiny_model(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["inference.py", "tiny:glm-4-9b-chat", "--max-new-tokens", "4", "--seed", "0",
                                      "--no-do-sample", "--dtype", "fp32"])
    with pytest.raises(SystemExit) as exit_info:  # typer exits 0 when the command returns
        run_main(inference.app)
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "=========" in lines and lines[-1] != "========="


def test_missing_model_and_bad_tools_file_are_one_line_errors(tmp_path, monkeypatch, capsys):
    for argv, message in (
        (["inference.py", str(tmp_path / "nope")], f"error: {tmp_path / 'nope'}: model folder not found"),
        (["inference.py", "tiny:glm-4-9b-chat", "--interactive", "--tools", str(tmp_path / "t.json")],
         f"error: {tmp_path / 't.json'}: tools[0].type: expected one of function, python, simple_browser, cogview, "
         "got None"),
    ):
        (tmp_path / "t.json").write_text('[{"name": "f"}]', encoding="utf-8")
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            run_main(inference.app)
        assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]

"""A LLaMA tokenizer folder read by plain transformers — a fresh interpreter that never imports the project — for
the golden-id checks of the folders the project writes (this venv's transformers, and vLLM's)."""
import json
import os
import subprocess

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "llama")

# Plain transformers, no code of the project: a fresh interpreter that never imports model_hub.
PLAIN_PROBE = """import json, sys
from transformers import AutoTokenizer
bad = []
for folder, name in zip(sys.argv[1::2], sys.argv[2::2]):
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "SentencePieceBackend", type(tok)
    assert "model_hub" not in sys.modules
    for case in json.load(open(f"{GOLDEN}/{name}.json", encoding="utf-8"))["strings"]:
        if tok(case["text"])["input_ids"] != case["ids_with_bos"]:
            bad.append((name, case["text"]))
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "文本：2008年1月，北京 99999 元。"}]
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) if tok.chat_template else None
    print(json.dumps([name, rendered and tok(rendered, add_special_tokens=False)["input_ids"]]))
print(json.dumps(bad))
"""


def run_plain_probe(python: str, folders: dict) -> tuple[list, dict]:
    """(golden strings read to other ids, {folder: chat-template prompt ids}) under `python`'s transformers;
    `folders` maps a saved LLaMA tokenizer folder to its golden file name (tests/golden/llama/NAME.json)."""
    argv = [str(item) for folder, name in folders.items() for item in (folder, name)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([python, "-c", PLAIN_PROBE.replace("{GOLDEN}", GOLDEN), *argv],
                            cwd="/", capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    prompts = dict(zip(folders, (json.loads(line)[1] for line in lines[-1 - len(folders):-1])))
    return json.loads(lines[-1]), prompts

"""LLaMA-Factory's OpenAI-style API (`llamafactory-cli api`, HF engine) as bench_7's peer, on the bench model.

`make llamafactory-setup` builds its venv (build/llamafactory-venv: LLaMA-Factory 0.9.5 pins transformers<=5.6,
our stack needs 5.23). The server gets the bench model through build/bench/<model>-llamafactory/: links to the
model's files plus a chat template, so that it renders the prompt our server renders for this model (the `alpaca`
prompt format: BOS, then model_hub.llama.prompts.ALPACA_TEMPLATE). LLaMA-Factory's own `alpaca` template is not that
prompt (no BOS, one newline where ours has two), so the template is left unset and LLaMA-Factory parses the
tokenizer's chat template into its slots, as it does for a model without a registered template; `prompt_ids_match`
checks in its venv that it encodes every bench prompt to our ids. The template below only adds what that parser
needs (a system and an assistant slot); the bench sends no system message, so the prompt is ours.
"""
import json
import os
import re
import subprocess

from bench.common import REPO
from model_hub.llama.prompts import ALPACA_TEMPLATE

VENV = os.path.join(REPO, "build", "llamafactory-venv")
CLI = os.path.join(VENV, "bin", "llamafactory-cli")
# LLaMA-Factory's parse_template needs a {{content}} slot for system, user and assistant turns.
CHAT_TEMPLATE = ("{{ bos_token }}{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ m['content'] }}"
                 "{%- elif m['role'] == 'user' -%}" + ALPACA_TEMPLATE.replace("{instruction}", "{{ m['content'] }}")
                 + "{% elif m['role'] == 'assistant' -%}{{ m['content'] }}{{ eos_token }}{%- endif -%}{%- endfor -%}")


def available() -> bool:
    return os.path.isfile(CLI)


def model_folder(model: str) -> str:
    """build/bench/<name>-llamafactory: links to the model's files and the chat template above (rewritten each run)."""
    folder = os.path.normpath(model) + "-llamafactory"
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(model):
        link = os.path.join(folder, name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(model, name)), link)
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    return folder


def server(model: str, port: int, threads: int) -> tuple[list[str], dict]:
    """The command and environment of `llamafactory-cli api` on 127.0.0.1:port (fp32, HF engine)."""
    env = {"API_HOST": "127.0.0.1", "API_PORT": str(port), "API_MODEL_NAME": "bench",
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "DISABLE_VERSION_CHECK": "1",
           "PYTHONPATH": ""}  # LLaMA-Factory's venv only: none of our packages
    return [CLI, "api", "--model_name_or_path", model_folder(model), "--infer_backend", "huggingface",
            "--infer_dtype", "float32"], env


_ENCODE = """import json, sys
from transformers import AutoTokenizer
from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=None))
prompts = json.load(sys.stdin)
print(json.dumps([template.encode_oneturn(tokenizer, [{"role": "user", "content": p},
                                                      {"role": "assistant", "content": ""}])[0] for p in prompts]))
"""


def prompt_ids_match(model: str, prompts: list[str], ours: list[list[int]]) -> int:
    """How many prompts LLaMA-Factory encodes to exactly our prompt ids (run in its venv, as its server does)."""
    done = subprocess.run([os.path.join(VENV, "bin", "python"), "-c", _ENCODE, model_folder(model)],
                          input=json.dumps(prompts), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": "", "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"LLaMA-Factory's template check failed: {done.stderr[-2000:]}")
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    return sum(a == b for a, b in zip(theirs, ours))


_BYTE_PIECES = re.compile(r"(?:<0x[0-9A-F]{2}>)+")


def readable(text: str) -> str:
    """transformers' generic sentencepiece class decodes byte-fallback pieces as "<0x0A>" text (ours as the
    bytes: README, vLLM's tokenizer note); turn them into their characters before answers are compared."""
    return _BYTE_PIECES.sub(lambda m: bytes(int(b, 16) for b in re.findall(r"<0x(..)>", m.group()))
                            .decode("utf-8", errors="replace"), text)

"""Serve what a recipe trained with vLLM, with the tokens, prompt, stop ids and tool calls it was trained with.

    python -m serving.vllm OUT                          # a merged export or a full-SFT folder
    python -m serving.vllm ADAPTER [ADAPTER2 …]         # LoRA adapters UNMERGED on their common base (multi-LoRA)
    python -m serving.vllm BASE ADAPTER …               # the same, with the base given (else adapter_config.json's)
    python -m serving.vllm OUT --port 8001 -- --tensor-parallel-size 2 --max-model-len 8192

What it prepares, in build/vllm/<hash>/ (the folders themselves are never written):
- tokenizer files that read text to the ids training used: for LLaMA folders the project's sentencepiece tokenizer
  (vLLM loads it through the project's vLLM plugin, installed by `make vllm-setup`), for GLM-4 the folder's own;
- the recipe's prompt as a chat template, generated from the same prompt-format record the recipe trains with
  (model_hub.prompt_format): NER / Alpaca single-turn prompts (the last user message), GLM-4's chat template
  over OpenAI messages with tools, tool calls and tool results;
- for GLM-4, tool calling on with the project's `glm4_9b_chat` parser (serving/vllm_glm4_tools.py).
Stop ids come from each folder's generation_config.json, which the recipes and the export write.

It prints the vLLM command and runs it (replacing this process). It binds 127.0.0.1 unless --host says otherwise;
the API key travels in the environment (VLLM_API_KEY), not on the command line. Not servable by vLLM, refused
in one line naming `python -m serving.api`: ChatGLM-6B (not in vLLM) and P-tuning v2 prefixes.
"""
import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys

from model_hub import REPO_DIR
from model_hub.loader import has_tokenizer, resolve_model_path, resolve_recorded_model_path, tokenizer_from_folder
from model_hub.prompt_format import detect_prompt_format, get_prompt_format
from model_hub.registry import FAMILIES, family_of_config
from tuning.errors import UserError, run_main
from tuning.files import atomic_dir, read_json

VENV_PYTHON = os.path.join(REPO_DIR, "build", "vllm-venv", "bin", "python")
PREPARED = os.path.join(REPO_DIR, "build", "vllm")
TOOL_PARSER = "glm4_9b_chat"
PREPARED_VERSION = 3  # bump when what prepare_tokenizer writes changes
OUR_SERVER = "python -m serving.api"


def family_of_folder(path: str) -> str:
    family = family_of_config(read_json(os.path.join(path, "config.json")))
    if family not in FAMILIES:
        raise UserError(f"model type {family!r} is not one of the project's families", path=path)
    return family


def split_folders(folders: list[str]) -> tuple[str | None, list[str]]:
    """(the base or merged model, the LoRA adapters) among the folders given; each checked first."""
    model, adapters = None, []
    for folder in folders:
        if not folder.startswith("tiny:") and os.path.isfile(os.path.join(folder, "adapter_config.json")):
            from tuning.publish import read_adapter_folder

            config = read_adapter_folder(folder)
            if config.get("peft_type") != "LORA":
                raise UserError(f"a {config.get('peft_type')} adapter (P-tuning v2 prefix) cannot be served by vLLM; "
                                f"serve it with `{OUR_SERVER} --adapter {folder}`", path=folder)
            adapters.append(folder)
        elif model is None:
            model = resolve_model_path(folder)
        else:
            raise UserError(f"two models given ({model} and this one); vLLM serves one base model (plus adapters)",
                            path=folder)
    return model, adapters


def common_base(model: str | None, adapters: list[str]) -> str:
    if model is not None:
        return model
    bases = set()
    for adapter in adapters:
        recorded = os.path.join(adapter, "adapter_config.json")
        base = read_json(recorded).get("base_model_name_or_path")
        if not base:
            raise UserError("base_model_name_or_path is empty; give the base model folder first", path=recorded)
        bases.add(resolve_recorded_model_path(base, f"base_model_name_or_path in {recorded}",
                                              "the base model folder as the first FOLDER"))
    if len(bases) != 1:
        raise UserError(f"the adapters were trained on different bases ({', '.join(sorted(bases))}); vLLM serves "
                        "the adapters of one base at a time", field="FOLDER")
    return bases.pop()


def prompt_format_of(family: str, model: str, adapters: list[str]) -> str:
    names = {detect_prompt_format(family, model, adapter) for adapter in adapters} or \
        {detect_prompt_format(family, model, None)}
    if len(names) != 1:
        raise UserError(f"the adapters were trained on different prompts ({', '.join(sorted(names))}); one vLLM "
                        "server has one chat template: serve them separately", field="FOLDER")
    return names.pop()


def prepare_tokenizer(family: str, model: str, adapters: list[str], prompt_format: str) -> str:
    """build/vllm/<hash>/tokenizer: the tokenizer training used + the recipe's prompt as chat_template.jinja."""
    source = next((a for a in adapters if has_tokenizer(a)), model)
    key = hashlib.sha256(json.dumps([PREPARED_VERSION, os.path.abspath(source), os.path.abspath(model),
                                     prompt_format, os.path.getmtime(source)]).encode()).hexdigest()[:16]
    folder = os.path.join(PREPARED, key, "tokenizer")
    if os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    if family == "llama":  # the original's ids, whatever class the folder names; saving keeps the space before "<s>"
        from model_hub.llama.tokenizer import load_llama_tokenizer

        tokenizer = load_llama_tokenizer(source)
    else:
        tokenizer = tokenizer_from_folder(source)
    template = get_prompt_format(prompt_format).chat_template(tokenizer)
    with atomic_dir(folder, "model", overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
        if family == "llama":
            # The saved folder names transformers' generic sentencepiece class (same ids, but it decodes byte-fallback
            # pieces as "<0x..>" text); vLLM, with the project's plugin registered, decodes with ours.
            config_path = os.path.join(tmp, "tokenizer_config.json")
            config = read_json(config_path)
            config["tokenizer_class"] = "LlamaSentencePieceTokenizer"
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(tmp, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
        # vLLM reads a config.json beside the tokenizer too (without one it logs errors and retries for seconds)
        shutil.copyfile(os.path.join(model, "config.json"), os.path.join(tmp, "config.json"))
    return folder


def vllm_command(args, model: str, adapters: list[str], family: str, tokenizer_dir: str) -> list[str]:
    names = [args.served_model_name or os.path.basename(os.path.normpath(model))]
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", names[0], "--tokenizer", tokenizer_dir,
               "--chat-template", os.path.join(tokenizer_dir, "chat_template.jinja"),
               "--host", args.host, "--port", str(args.port), "--dtype", args.dtype]
    if adapters:
        ranks = [int(read_json(os.path.join(a, "adapter_config.json")).get("r") or 8) for a in adapters]
        command += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(max(ranks))]
        command += ["--lora-modules", *(f"{os.path.basename(os.path.normpath(a))}={os.path.abspath(a)}"
                                        for a in adapters)]
    if family == "glm4":
        command += ["--enable-auto-tool-choice", "--tool-call-parser", TOOL_PARSER,
                    "--tool-parser-plugin", os.path.join(REPO_DIR, "serving", "vllm_glm4_tools.py")]
    return command + args.extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="a merged export / full-SFT folder / base model (or tiny:NAME), and/or LoRA adapters")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--api_key", default=None, help="require this key (better: set VLLM_API_KEY, which is what "
                        "this passes on; a key on the command line is visible to every user of the machine)")
    parser.add_argument("--served_model_name", default=None, help="the base's name in /v1/models (default: its "
                        "folder name); adapters are listed under their folder names")
    parser.add_argument("--dtype", default=None, help="vLLM's --dtype (default: float32 on a CPU, as our server; "
                        "auto on a GPU)")
    parser.add_argument("--vllm_python", default=os.environ.get("VLLM_PYTHON", VENV_PYTHON),
                        help="the Python of vLLM's venv (default: $VLLM_PYTHON or build/vllm-venv, made by "
                             "`make vllm-setup`)")
    parser.add_argument("--dry_run", action="store_true", help="prepare and print the command, do not run it")
    return parser


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    model, adapters = split_folders(args.folders)
    model = common_base(model, adapters)
    family = family_of_folder(model)
    if family == "chatglm6b":
        raise UserError(f"ChatGLM-6B is not a model vLLM serves; serve it with `{OUR_SERVER} --model {model}`"
                        + (f" --adapter {adapters[0]}" if adapters else ""), path=model)
    if not os.path.isfile(args.vllm_python):
        raise UserError("vLLM's venv is not there; make it with `make vllm-setup` (or pass --vllm_python)",
                        path=args.vllm_python)
    prompt_format = prompt_format_of(family, model, adapters)
    if args.dtype is None:
        import torch

        args.dtype = "auto" if torch.cuda.is_available() else "float32"
    tokenizer_dir = prepare_tokenizer(family, model, adapters, prompt_format)
    command = vllm_command(args, model, adapters, family, tokenizer_dir)
    env = dict(os.environ)
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key
    print(f"prompt format: {prompt_format}; tokenizer and chat template: {tokenizer_dir}", flush=True)
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return
    if shutil.which(command[0]) is None and not os.path.isfile(command[0]):
        raise UserError("not found", path=command[0])
    os.execve(command[0], command, env)


if __name__ == "__main__":
    run_main(main)

"""The command-line flags that choose what to serve, shared by the API server and the web demo."""
import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (base, SFT or exported) or tiny:NAME; with "
                        "--adapter, overrides the base in adapter_config.json. Neither: the newest output of a "
                        "`make <recipe>` run, else tiny:glm-4-9b-chat (what `make serve` / `make web-demo` do)")
    parser.add_argument("--adapter", default=None, help="LoRA or P-tuning v2 adapter folder a recipe trained")
    parser.add_argument("--prompt_format", default=None, help="override the recorded prompt format "
                        "(chatglm_tuning, llama_ner, alpaca, glm4_chat, chatglm6b_chat)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16, fp16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")


def chosen_model(args) -> tuple[str | None, str | None]:
    """(model, adapter) to load: the flags, or with neither the newest `make <recipe>` output (else the tiny GLM-4)."""
    if args.model is not None or args.adapter is not None:
        return args.model, args.adapter
    from .last_trained import last_trained

    model, adapter = last_trained(REPO)
    print(f"serving the last trained model: {adapter or model}", flush=True)
    return model, adapter

"""Export a trained model as one standalone model folder: a LoRA adapter merged into its base, or a full
fine-tuning output re-sharded / converted to another dtype.

    python -m model_hub.export SRC OUT [--base DIR|tiny:NAME] [--dtype bf16|fp16|fp32]
        [--layout native|original --original_dir DIR] [--max_shard_size 2GB] [--overwrite]

SRC: a LoRA adapter folder (adapter_config.json; its base is base_model_name_or_path, or --base), a Trainer
checkpoint-N, a llama_ner adapter_model folder, or a full-SFT output folder (config.json + weights).
OUT: safetensors shards + index, config.json, generation_config.json (the family's eos/pad ids), the tokenizer
files (and chat template), README.md naming base, adapter, dtype and this command. It loads with
AutoModelForCausalLM/AutoTokenizer.from_pretrained(OUT): LLaMA and native GLM-4 with plain transformers (vLLM,
llama.cpp's convert_hf_to_gguf.py read the same folder); ChatGLM-6B keeps THUDM's weight names and config
(`import model_hub` first, or THUDM's code with trust_remote_code).

--layout original (GLM-4): THUDM's glm-4-9b-chat names and config (fused query_key_value), the exact inverse
of convert_glm4_to_hf.py; --original_dir is the original model folder whose code and tokenizer files are copied.
--dtype: default keeps every tensor's stored dtype. The merge runs shard by shard (one base shard, the adapter and
one tensor's temporaries in memory), so a 9B model merges in a few GB of RAM. OUT is written to a staging folder
and renamed; a non-empty OUT is refused without --overwrite. P-tuning v2 adapters are not weight deltas: serve
base + adapter.
"""
import argparse
import fnmatch
import json
import os
import shlex
import shutil
import sys

from tqdm import tqdm

from tuning.errors import UserError, run_main
from tuning.files import atomic_dir, read_json
from tuning.outputs import is_inside, refuse_inputs

from .lora_merge import Adapter, read_adapter_config
from .registry import FAMILIES
from .shards import ShardWriter, find_shards, has_weights, iter_shard, parse_size, tensor_shapes

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "ice_text.model",
                   "vocab.json", "merges.txt", "*.py", "LICENSE*", "MODEL_LICENSE*", "NOTICE*", "USE_POLICY.md")
PTUNING_TYPES = ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")


class Plan:
    """What one export reads and writes, all checked before anything is written."""

    def __init__(self, src: str, base: str | None, layout: str, original_dir: str | None):
        self.src, self.adapter, self.adapter_base = src, None, None
        self.prefix, self.prefix_config = {}, {}  # a ChatGLM-6B P-tuning v2 checkpoint: prefix encoder tensors
        if not os.path.isdir(src):
            raise UserError("folder not found", path=src)
        if os.path.isfile(os.path.join(src, "adapter_config.json")):
            self._read_adapter(src, base)
        elif os.path.isfile(os.path.join(src, "config.json")) and has_weights(src):
            self.weights_dir = src
            if prefix_encoder_only(src):
                self._read_prefix_checkpoint(src, base)
            elif base:
                raise UserError("SRC is a full model (config.json + weights); --base is only for adapters",
                                field="base")
        else:
            raise UserError("not an adapter folder (adapter_config.json) nor a model folder (config.json + "
                            "weights)", path=src)
        config_path = os.path.join(self.weights_dir, "config.json")
        config = read_json(config_path)
        if not isinstance(config, dict):
            raise UserError("expected a JSON object", path=config_path)
        self.config = {**config, **self.prefix_config}
        model_type = self.config.get("model_type")
        by_type = {family.model_type: family.name for family in FAMILIES.values()}
        if model_type not in by_type:
            raise UserError(f"model_type {model_type!r} is not one this project exports ({', '.join(by_type)})",
                            path=os.path.join(self.weights_dir, "config.json"), field="model_type")
        self.family = by_type[model_type]
        self.layout, self.original_dir = layout, original_dir
        if layout == "original" and self.family != "glm4":
            raise UserError(f"--layout original is for GLM-4; this is {self.family} (already in its original layout)",
                            field="layout")
        if (layout == "original") != bool(original_dir):
            raise UserError("--layout original needs --original_dir (the original glm-4-9b-chat folder: its code "
                            "and tokenizer files are copied), and --original_dir is only for --layout original",
                            field="original_dir")
        if original_dir and not os.path.isfile(os.path.join(original_dir, "config.json")):
            raise UserError("not the original model folder: config.json is missing", path=original_dir)
        if original_dir:
            from .glm4.native import original_values

            try:
                original_values(self.config)
            except (ValueError, KeyError) as exc:
                raise UserError(f"cannot be written in THUDM's original layout: {exc}", path=config_path) from None
        self.shards = find_shards(self.weights_dir)
        self.shapes = tensor_shapes(self.shards)
        if self.adapter:
            self._check_adapter_fits()
        if self.prefix:
            self._check_prefix_fits()
        self.tokenizer_dir = src if os.path.isfile(os.path.join(src, "tokenizer_config.json")) else self.weights_dir
        if layout != "original":
            self._check_tokenizer()

    def _check_tokenizer(self):
        """The tokenizer that goes into OUT loads (no remote code) and fits the embedding."""
        from transformers import AutoTokenizer

        from . import register_with_transformers

        register_with_transformers()  # our tokenizer classes

        source = self.tokenizer_dir
        if not os.path.isfile(os.path.join(source, "tokenizer_config.json")):
            raise UserError("no tokenizer here (tokenizer_config.json) nor with the adapter; an export needs one",
                            path=source)
        size = len(AutoTokenizer.from_pretrained(source, trust_remote_code=False))  # our classes need no code
        vocab = self.config.get("vocab_size")
        if vocab and size > vocab:
            raise UserError(f"the tokenizer has {size} tokens, the model {self.weights_dir} only {vocab} embedding "
                            "rows (vocab_size): the vocabulary size differs" + (
                                "; merge_llama_with_chinese_lora.py resizes it for LoRAs that add tokens"
                                if self.family == "llama" else ""), path=source)

    def _read_adapter(self, src: str, base: str | None):
        from .loader import resolve_model_path

        config_path = os.path.join(src, "adapter_config.json")
        config = read_adapter_config(src)
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type in PTUNING_TYPES:
            raise UserError(f"{peft_type} (P-tuning v2) is a learned prefix, not a weight delta: it cannot be "
                            "merged. Serve base + adapter (glm4_finetune/inference.py SRC loads both); a ChatGLM-6B "
                            "P-tuning checkpoint (config.json with pre_seq_len + prefix encoder) does export, with --base",
                            path=config_path, field="peft_type")
        self.adapter_base = config.get("base_model_name_or_path")
        chosen = base or self.adapter_base
        if not chosen:
            raise UserError("names no base model (base_model_name_or_path is empty); pass --base DIR",
                            path=config_path, field="base_model_name_or_path")
        if not base and not chosen.startswith("tiny:") and not os.path.isdir(chosen):
            raise UserError(f"the base model {chosen} named here is not a folder on this machine; pass --base DIR",
                            path=config_path, field="base_model_name_or_path")
        self.weights_dir = resolve_model_path(chosen)
        self.adapter = Adapter.load(src)

    def _read_prefix_checkpoint(self, src: str, base: str | None):
        """THUDM's ChatGLM-6B P-tuning v2 output: config.json with pre_seq_len + only the prefix encoder's weights.
        The model keeps its prefix encoder inside, so base weights + prefix encoder is a standalone model."""
        from .loader import resolve_model_path

        config = read_json(os.path.join(src, "config.json"))
        if not base:
            raise UserError("a P-tuning v2 checkpoint holds only the prefix encoder; pass --base DIR (the ChatGLM-6B "
                            "it was trained on)", path=src, field="base")
        self.weights_dir = resolve_model_path(base)
        self.prefix = {name: tensor for shard in find_shards(src) for name, tensor in iter_shard(shard)}
        self.prefix_config = {k: config[k] for k in ("pre_seq_len", "prefix_projection") if k in config}

    def _check_adapter_fits(self):
        base = f"the base {self.weights_dir} ({self.config.get('model_type')})"
        missing = sorted(self.adapter.names() - self.shapes.keys())
        if missing:
            raise UserError(f"adapter changes {missing[0]}, which {base} does not have ({len(missing)} of "
                            f"{len(self.adapter.names())} tensors missing; the adapter was trained on "
                            f"{self.adapter_base or 'another model'})", path=self.src)
        for name in sorted(self.adapter.names()):
            shape, shard = self.shapes[name]
            self.adapter.check_shape(name, shape, shard)
        if self.adapter.is_zero():
            print(f"warning: {self.src}: every lora_B is zero (an untrained adapter): the export equals the base")

    def _check_prefix_fits(self):
        import torch

        from .chatglm6b import ChatGLMConfig
        from .chatglm6b.modeling import PrefixEncoder

        if self.family != "chatglm6b":
            raise UserError(f"a prefix-encoder checkpoint needs a ChatGLM-6B base; {self.weights_dir} is "
                            f"{self.family}", path=self.src, field="base")
        config = {k: v for k, v in self.config.items() if k not in ("model_type", "transformers_version")}
        with torch.device("meta"):
            expected = PrefixEncoder(ChatGLMConfig(**config)).state_dict()
        got = {name.removeprefix("transformer.prefix_encoder."): t for name, t in self.prefix.items()}
        for name, tensor in expected.items():
            if name not in got or got[name].shape != tensor.shape:
                shape = tuple(got[name].shape) if name in got else "missing"
                raise UserError(f"prefix encoder tensor {name} is {shape}; the base {self.weights_dir} needs "
                                f"{tuple(tensor.shape)} (pre_seq_len, num_layers, hidden_size)", path=self.src)


def prefix_encoder_only(folder: str) -> bool:
    """A checkpoint whose weights are only a ChatGLM-6B prefix encoder (THUDM's ptuning/main.py saves that)."""
    names = tensor_shapes(find_shards(folder))
    return bool(names) and all(n.startswith("transformer.prefix_encoder.") for n in names)


def check_out(out: str, inputs: list[str], overwrite: bool) -> None:
    """Before any work: OUT neither is nor holds an input nor lies inside one (a model folder in the base model's
    folder, or in the adapter's, is taken for part of it by later loads), and is new or empty unless --overwrite."""
    refuse_inputs(out, inputs)
    for folder in inputs:
        if folder and os.path.isdir(folder) and is_inside(out, folder):
            raise UserError(f"is inside {folder}, an input of this export; write the model elsewhere", path=out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise UserError("already exists and is not empty (use --overwrite to replace it)", path=out)


def write_weights(plan: Plan, tmp: str, dtype: str | None, max_bytes: int) -> None:
    import torch

    from .glm4.convert import Layout, ToOriginal
    from .glm4.native import original_values

    target = getattr(torch, dtype) if dtype else None
    inverse = ToOriginal(Layout(original_values(plan.config))) if plan.layout == "original" else None
    writer = ShardWriter(tmp, max_bytes)
    for shard in tqdm(plan.shards, desc="exporting shards", unit="shard"):
        for name, tensor in iter_shard(shard):
            out_dtype = target if target is not None and tensor.is_floating_point() else tensor.dtype
            tensor = plan.adapter.merged(name, tensor, out_dtype) if plan.adapter else tensor.to(out_dtype)
            for out_name, out_tensor in inverse.add(name, tensor) if inverse else [(name, tensor)]:
                writer.add(out_name, out_tensor)
            del tensor
    for out_name, out_tensor in inverse.finish() if inverse else plan.prefix.items():
        writer.add(out_name, out_tensor.to(target) if target is not None else out_tensor)
    writer.finish()


def export_config(plan: Plan, dtype: str | None) -> dict:
    from .glm4.native import original_config, with_llama_cpp_keys

    config = {k: v for k, v in plan.config.items() if k != "_name_or_path"}
    if plan.layout == "original":
        same_model = os.path.join(plan.original_dir, "config.json")
        template = read_json(same_model)
        try:
            return original_config(config, template, dtype)
        except ValueError as exc:
            raise UserError(f"describes another model than the export: {exc}", path=same_model) from None
    if dtype:
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = dtype
    return with_llama_cpp_keys(config) if plan.family == "glm4" else config


def generation_config(plan: Plan) -> dict:
    """The source's generation_config.json, with the family's stop and pad ids where it has none."""
    from .registry import MODELS

    spec = next(s for s in MODELS.values() if s.family == plan.family)
    for folder in (plan.original_dir, plan.src, plan.weights_dir):
        path = os.path.join(folder or "", "generation_config.json")
        if folder and os.path.isfile(path):
            config = read_json(path)
            break
    else:
        config = {}
    stops = list(spec.stop_ids)
    config.setdefault("eos_token_id", stops[0] if len(stops) == 1 else stops)
    pad = plan.config.get("pad_token_id", spec.pad_id)
    if pad is not None:
        config.setdefault("pad_token_id", pad)
    return config


def copy_tokenizer(plan: Plan, tmp: str) -> None:
    """Tokenizer files (and, for the original layout, THUDM's code) copied as they are; a LLaMA tokenizer is then
    declared so that plain transformers reads it to the original ids (same tokenizer.model)."""
    source = plan.original_dir or plan.tokenizer_dir
    skipped = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if not any(fnmatch.fnmatch(name, p) for p in TOKENIZER_FILES):
            continue
        if os.path.islink(path) or not os.path.isfile(path):
            # A link would be copied as the file it points to, wherever that is (a credentials file named LICENSE
            # would become a regular file of OUT, ready to publish): only regular files inside the folder.
            skipped.append(name)
            continue
        shutil.copyfile(path, os.path.join(tmp, name))
    if skipped:
        print(f"note: not copied from {source} (symbolic links or not regular files): {', '.join(skipped)}")
    if plan.family == "llama":
        write_portable_llama_tokenizer(tmp)


def write_portable_llama_tokenizer(folder: str) -> None:
    """The copied LLaMA tokenizer saved again by our class, which declares it so that plain transformers and vLLM
    read tokenizer.model to the original ids (model_hub.llama.tokenizer.portable_tokenizer_config); the copied
    special_tokens_map.json / added_tokens.json / tokenizer.json would override or contradict that declaration."""
    from .llama.tokenizer import load_llama_tokenizer

    tokenizer = load_llama_tokenizer(folder)
    for name in ("special_tokens_map.json", "added_tokens.json", "tokenizer.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    tokenizer.save_pretrained(folder)


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_readme(plan: Plan, tmp: str, dtype: str | None, command: str) -> None:
    kind = {"llama": "LlamaForCausalLM", "chatglm6b": "ChatGLM-6B (THUDM's layout)",
            "glm4": "THUDM glm-4-9b-chat layout" if plan.layout == "original" else "GlmForCausalLM"}[plan.family]
    merged = "LoRA, merged" if plan.adapter else "P-tuning v2 prefix encoder, kept inside the model"
    lines = ["# Exported model", "",
             f"- base: `{plan.weights_dir}`" if plan.src != plan.weights_dir else
             f"- model: `{plan.src}` (full fine-tuning output)",
             f"- adapter: `{plan.src}` ({merged})" if plan.src != plan.weights_dir else "- adapter: none",
             f"- dtype: {dtype or 'as stored in the source'}", f"- layout: {kind}",
             f"- made by: `{command}`", "",
             "Load with `AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`"
             + (" after `import model_hub`" if plan.family == "chatglm6b" else
                " with trust_remote_code=True (THUDM's code)" if plan.layout == "original" else "") + ".",
             *(["", "The tokenizer is declared as transformers' sentencepiece class: plain transformers and vLLM read "
                "text to the original's ids (digit and whitespace runs included), and chat_template.jinja renders "
                "the prompt the model was trained on. That generic class decodes byte-fallback pieces as `<0x..>` "
                "text; after `import model_hub`, `model_hub.loader.load_tokenizer(folder)` decodes as the original. "
                "vLLM: `python -m serving.vllm FOLDER`."] if plan.family == "llama" else []), ""]
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def export(src: str, out: str, *, base: str | None = None, dtype: str | None = None, layout: str = "native",
           original_dir: str | None = None, max_shard_size: str | int = "2GB", overwrite: bool = False,
           command: str | None = None) -> str:
    max_bytes = parse_size(max_shard_size)
    plan = Plan(src, base, layout, original_dir)
    inputs = [p for p in (plan.src, plan.weights_dir, plan.original_dir) if p]
    check_out(out, inputs, overwrite)
    torch_dtype = DTYPES[dtype] if dtype else None
    config = export_config(plan, torch_dtype)
    command = command or "python -m model_hub.export " + shlex.join([src, out] + (["--base", base] if base else []))
    with atomic_dir(out, "model", inputs=inputs, overwrite=overwrite) as tmp:
        copy_tokenizer(plan, tmp)
        write_weights(plan, tmp, torch_dtype, max_bytes)
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "generation_config.json"), generation_config(plan))
        write_readme(plan, tmp, torch_dtype, command)
        copy_prompt_format(plan, tmp)
    return out


def copy_prompt_format(plan: Plan, tmp: str) -> None:
    """The prompt the source was trained on travels with the export (prompt_format.json, and for LLaMA the chat
    template made from it): a server cannot tell it from the merged weights."""
    from .prompt_format import PROMPT_FORMAT_FILE, detect_prompt_format, record_prompt_format

    # Unrecorded (trained before records were written): the family's default, as serving.api would render it.
    adapter = plan.src if plan.src != plan.weights_dir else None
    name = detect_prompt_format(plan.family, plan.weights_dir, adapter)
    record = os.path.join(plan.src, PROMPT_FORMAT_FILE)
    recipe = read_json(record).get("recipe", "") if os.path.isfile(record) else ""
    record_prompt_format(tmp, name, str(recipe))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m model_hub.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="adapter folder, checkpoint-N, or full model folder")
    parser.add_argument("out", metavar="OUT", help="new folder for the standalone model")
    parser.add_argument("--base", default=None, help="base model folder or tiny:NAME (default: the adapter's "
                        "base_model_name_or_path)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of the written weights (default: as stored in the source)")
    parser.add_argument("--layout", choices=["native", "original"], default="native",
                        help="GLM-4 only: native GlmForCausalLM (default) or THUDM's original glm-4-9b-chat layout")
    parser.add_argument("--original_dir", default=None, help="with --layout original: the original model folder "
                        "(its code and tokenizer files are copied)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    args = parser.parse_args(argv)
    command = "python -m model_hub.export " + shlex.join(sys.argv[1:] if argv is None else argv)
    export(args.src, args.out, base=args.base, dtype=args.dtype, layout=args.layout, original_dir=args.original_dir,
           max_shard_size=args.max_shard_size, overwrite=args.overwrite, command=command)
    print(f"exported {args.src} -> {args.out}")


if __name__ == "__main__":
    run_main(main)

"""GPU memory of one training step on paper: weights, gradients, optimizer states, activations, per GPU.

    python -m model_hub.estimate_memory glm-4-9b-chat lora --seq_len 1025 --gradient_checkpointing true
    python -m model_hub.estimate_memory chatglm-6b lora --load_in_8bit --batch_size 6 --seq_len 384 --dtype fp16
    python -m model_hub.estimate_memory glm-4-9b-chat lora --quantization_bit 4 --seq_len 1025      # QLoRA
    python -m model_hub.estimate_memory glm-4-9b-chat sft --zero_stage 3 --num_gpus 8 --seq_len 769 --json
    python -m model_hub.estimate_memory path/to/config.json ptuning_v2 --prefix_length 512
    python -m model_hub.estimate_memory glm-4-9b-chat lora --objective dpo --seq_len 1024   # preference/train_dpo.py
    python -m model_hub.estimate_memory all --objective dpo --seq_len 1024 --gradient_checkpointing true  # table

MODEL is a registered name (chatglm-6b, glm-4-9b-chat, llama-7b, chinese-llama-7b, chinese-alpaca-7b: the real
config vendored in model_hub/tokenizer_files/) or a config.json / model folder; "all": one row per real model
(ChatGLM-6B, Chinese-Alpaca-7B, GLM-4-9B) × LoRA, QLoRA 4-bit, full fine-tuning. METHOD is lora, ptuning_v2 or sft
(full fine-tuning). --objective: sft (default), or preference training with TRL 1.16 (preference/train_dpo.py): dpo
(and its other pairwise losses), orpo, kto; --batch_size then counts pairs (dpo, orpo) or completions (kto).

Assumptions (all bytes, per GPU):
- parameters are counted exactly from the config (ChatGLM-6B: 6,173,286,400; GLM-4-9B: 9,399,951,360).
- frozen base weights: N × dtype bytes. --quantization_bit 8 (= --load_in_8bit): the linear weights of the
  decoder layers in bitsandbytes LLM.int8, 1 byte each + one fp32 scale per output row. --quantization_bit 4
  (QLoRA: nf4, blocks of 64, double quantization), per linear weight of n = in × out elements: n/2 bytes of
  packed 4-bit codes + one 8-bit absmax per block + one fp32 scale per 256 blocks + the fp32 offset + the two
  code tables bitsandbytes keeps with each layer (16 + 256 fp32). Embeddings, output layer, norms and biases
  stay in --dtype in both cases (the recipes keep them so; peft's upcast to fp32 is not used).
- LoRA / prefix parameters are fp32 (peft keeps adapters in fp32): 4 weight + 4 gradient + 8 AdamW = 16 B each.
- full fine-tuning (sft): weight and gradient in --dtype; AdamW states as --optimizer_states: "fp32" = fp32 master
  copy + two fp32 moments (12 B, mixed precision and every DeepSpeed ZeRO optimizer), "model" = two moments in
  --dtype and no master copy (pure bf16 torch AdamW). ZeRO stage 1 splits optimizer states over --num_gpus, stage 2
  also gradients, stage 3 also weights, and then holds two gathered layers (the current and the prefetched one).
- activations (--dtype, or 4 B for fp32) saved by autograd in one decoder layer, b = batch, s = sequence, h =
  hidden, k = K/V width (kv heads × head dim), f = MLP width, a = heads, t = s + prefix length:
      6·b·s·h (two norm inputs, two norm outputs, q, attention output) + 2·b·t·k (keys, values)
      + MLP: 3·b·s·f gated (gate, up, their product) or 2·b·s·f (fc1 output, GeLU output)
      + attention: eager a·b·s·t probabilities (+ the same in fp32 when softmax runs in fp32), sdpa 4 B · a·b·s
        (log-sum-exp only);
  without gradient checkpointing every layer keeps this; with it every layer keeps only its input (b·s·h) and
  one layer is recomputed at a time (+ one layer's activations).
  Output layer and loss, at the cross-entropy of the originals' code (logits.float(), then the shifted
  .contiguous() copy): b·s·V logits in --dtype + fp32 copy + shifted fp32 copy + fp32 log-softmax = 14 B per
  logit for 16-bit (16 B for fp32).
- fixed overhead --overhead_mib (default 600 MiB): the CUDA context with PyTorch's kernels loaded (~500 MiB on an
  A100 with PyTorch 2) plus cuBLAS workspaces; a constant, not fitted. Allocator caching and fragmentation, and the
  evaluation/generation phase, are not modelled: nvidia-smi figures include them.
- preference objectives (TRL 1.16), on top of the above:
  dpo: chosen and rejected go through the model in one batch: activations of 2·b rows. The reference: LoRA and QLoRA
  = the same weights with the adapter disabled (nothing more; continuing an SFT adapter adds its frozen copy, adapter-
  sized); full fine-tuning = a frozen second copy of the weights in --dtype ("reference_weights": no gradients, no
  optimizer states; split over --num_gpus with ZeRO-3). Its forward runs without autograd after the policy's and
  keeps nothing, so it adds no peak. The output layer is TRL's fused LM head (no b·s·V logits): one tile of 4,096
  tokens × 32,768 vocabulary entries in --dtype, the scored hidden states kept for backward (--dtype) and their fp32
  gradient (4 B · tokens · h), and, when the output layer trains (full) in 16 bits, its fp32 gradient accumulator
  (4 B · V · h; in fp32 the accumulator is the gradient itself).
  kto: as dpo with b rows (the KL rows run without autograd). orpo (trl.experimental, no reference model, no fused
  head): activations of 2·b rows, the full logits of the 2·b rows and their log-softmax in --dtype (2 × dtype B per
  logit), and the chosen half's NLL term (shifted copy and log-softmax: 2 × dtype B per logit of b rows).
"""
import argparse
import json
import os
from dataclasses import asdict, dataclass


from tuning.errors import UserError, parse_bool, run_main

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("lora", "ptuning_v2", "sft")
OBJECTIVES = ("sft", "dpo", "orpo", "kto")
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768  # TRL's fused LM head tile (trl.kernels.chunked_logprob, trl.trainer.utils)
REAL_MODELS = ("chatglm-6b", "chinese-alpaca-7b", "glm-4-9b-chat")
MIB = 2**20
NF4_BLOCK, ABSMAX_BLOCK = 64, 256        # bitsandbytes: 64 weights per absmax, 256 absmax per fp32 scale
NF4_CODE, DYNAMIC_CODE = 16 * 4, 256 * 4  # the nf4 and the 8-bit absmax code tables, fp32, per layer


@dataclass
class Arch:
    """The sizes that decide memory, whatever the config calls them."""
    family: str
    hidden: int
    layers: int
    heads: int
    kv_width: int          # K (and V) width per token: kv heads × head dim
    ffn: int               # MLP inner width (per branch for gated MLPs)
    gated: bool            # SwiGLU (gate + up) vs GeLU MLP
    vocab: int
    tied: bool             # output layer shares the embedding
    qkv_bias: bool
    dense_bias: bool       # biases on attention output and MLP linears
    norm_params: int       # parameters of one norm (h for RMSNorm, 2h for LayerNorm)
    q_width: int           # query width (heads × head dim)
    attention: str         # default attention implementation of the original code: eager | sdpa
    softmax_fp32: bool


def arch_from_config(config: dict, path: str) -> Arch:
    model_type = config.get("model_type")
    try:
        if model_type == "chatglm" and "padded_vocab_size" in config:  # GLM-4, original (remote code) layout
            head_dim = config["kv_channels"]
            groups = config["multi_query_group_num"] if config.get("multi_query_attention") else config["num_attention_heads"]
            return Arch("glm4", config["hidden_size"], config["num_layers"], config["num_attention_heads"],
                        groups * head_dim, config["ffn_hidden_size"], True, config["padded_vocab_size"],
                        bool(config.get("tie_word_embeddings", False)), bool(config.get("add_qkv_bias")),
                        bool(config.get("add_bias_linear")), config["hidden_size"] * (1 if config.get("rmsnorm") else 2),
                        config["num_attention_heads"] * head_dim, config.get("attn_implementation", "eager"),
                        bool(config.get("attention_softmax_in_fp32", True)))
        if model_type == "chatglm":  # ChatGLM-6B: LayerNorm with bias, GeLU MLP, biases everywhere, tied output
            h = config["hidden_size"]
            return Arch("chatglm6b", h, config["num_layers"], config["num_attention_heads"], h,
                        config.get("inner_hidden_size", 4 * h), False, config["vocab_size"], True, True, True, 2 * h,
                        h, "eager", True)
        if model_type in ("llama", "glm"):
            h, heads = config["hidden_size"], config["num_attention_heads"]
            head_dim = config.get("head_dim") or h // heads
            kv = config.get("num_key_value_heads") or heads
            return Arch("llama" if model_type == "llama" else "glm4", h, config["num_hidden_layers"], heads,
                        kv * head_dim, config["intermediate_size"], True, config["vocab_size"],
                        bool(config.get("tie_word_embeddings", False)), bool(config.get("attention_bias", False)),
                        False, h, heads * head_dim, config.get("attn_implementation") or "eager", True)
    except KeyError as exc:
        raise UserError(f"config lacks {exc.args[0]!r} (needed for a {model_type} model)", path=path) from None
    raise UserError(f"model_type {model_type!r} not supported; expected chatglm, glm or llama", path=path)


def load_arch(model: str) -> tuple[Arch, str]:
    """(Arch, config path) of a registered name, a config.json or a model folder."""
    from .registry import MODELS

    if model in MODELS:
        from . import tokenizer_files

        path = os.path.join(tokenizer_files(MODELS[model].files), "config.json")
    else:
        path = os.path.join(model, "config.json") if os.path.isdir(model) else model
        if not os.path.isfile(path):
            raise UserError(f"not a registered model ({', '.join(MODELS)}) nor a config.json / model folder",
                            path=model)
    from tuning.files import read_json

    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError("expected a JSON object", path=path)
    return arch_from_config(config, path), path


def linear_shapes(arch: Arch) -> dict[str, tuple[int, int, int]]:
    """Per-layer linear layers: name → (in, out, count); names as the registry gives them for our layout."""
    from .registry import get_family

    h, f = arch.hidden, arch.ffn
    if arch.family == "chatglm6b":  # fused QKV, GeLU MLP
        mlp_in = 2 * f if arch.gated else f
        shapes = [(h, arch.q_width + 2 * arch.kv_width), (arch.q_width, h), (h, mlp_in), (f, h)]
    elif arch.family == "glm4":  # native GlmForCausalLM: split q/k/v, fused gate_up
        shapes = [(h, arch.q_width), (h, arch.kv_width), (h, arch.kv_width), (arch.q_width, h), (h, 2 * f), (f, h)]
    else:  # llama
        shapes = [(h, arch.q_width), (h, arch.kv_width), (h, arch.kv_width), (arch.q_width, h), (h, f), (h, f),
                  (f, h)]
    names = get_family(arch.family).linear_modules
    return {name: (i, o, 1) for name, (i, o) in zip(names, shapes, strict=True)}


def count_parameters(arch: Arch) -> dict:
    """Exact parameter counts: layer linear weights, everything else (embeddings, output layer, norms, biases)."""
    linear = sum(i * o * n for i, o, n in linear_shapes(arch).values()) * arch.layers
    qkv_out = arch.q_width + 2 * arch.kv_width
    per_layer_bias = (qkv_out if arch.qkv_bias else 0)
    if arch.dense_bias:
        per_layer_bias += arch.hidden + (2 * arch.ffn if arch.gated else arch.ffn) + arch.hidden
    norms = 2 * arch.norm_params * arch.layers + arch.norm_params  # two per layer + the final one
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    other = embeddings + norms + per_layer_bias * arch.layers
    return {"total": linear + other, "layer_linear": linear, "other": other}


def quantized_bytes(n_in: int, n_out: int, bits: int) -> int:
    """Bytes of one bitsandbytes-quantized linear weight (no bias): nf4 with double quantization, or LLM.int8."""
    n = n_in * n_out
    if bits == 8:
        return n + 4 * n_out  # int8 weights + the fp32 scale of each output row
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // ABSMAX_BLOCK) + 4 + NF4_CODE + DYNAMIC_CODE


def layer_linear_bytes(arch: Arch, bits: int | None, dtype_bytes: int = 2) -> int:
    """Bytes of every decoder-layer linear weight, quantized (4/8) or at dtype_bytes."""
    per_layer = sum(n * (quantized_bytes(i, o, bits) if bits else i * o * dtype_bytes)
                    for i, o, n in linear_shapes(arch).values())
    return per_layer * arch.layers


def lora_parameters(arch: Arch, rank: int, targets: list[str]) -> int:
    shapes = linear_shapes(arch)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise UserError(f"unknown module(s) {', '.join(unknown)} for {arch.family}; expected some of "
                        f"{', '.join(shapes)}", field="lora_targets")
    return arch.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def activation_bytes(arch: Arch, *, batch: int, seq: int, prefix: int, act_bytes: int, checkpointing: bool,
                     attention: str) -> dict:
    b, s, h, t = batch, seq, arch.hidden, seq + prefix
    elements = 6 * b * s * h + 2 * b * t * arch.kv_width + (3 if arch.gated else 2) * b * s * arch.ffn
    layer = elements * act_bytes
    if attention == "eager":
        probs = arch.heads * b * s * t
        layer += probs * act_bytes + (probs * 4 if arch.softmax_fp32 and act_bytes < 4 else 0)
    else:
        layer += arch.heads * b * s * 4
    layers = (arch.layers * b * s * h * act_bytes + layer) if checkpointing else arch.layers * layer
    per_logit = act_bytes + 12 if act_bytes < 4 else 16
    return {"layers": layers, "logits": b * s * arch.vocab * per_logit, "one_layer": layer}


def estimate(arch: Arch, method: str, *, dtype: str = "bf16", batch_size: int = 1, seq_len: int = 512,
             gradient_checkpointing: bool = False, zero_stage: int = 0, num_gpus: int = 1, load_in_8bit: bool = False,
             quantization_bit: int | None = None, lora_rank: int = 8, lora_targets: list[str] | None = None, prefix_length: int = 128,
             optimizer_states: str = "fp32", attention: str | None = None, overhead_mib: float = 600,
             objective: str = "sft") -> dict:
    """Bytes per GPU of each part; see the module docstring for the formulas."""
    if method not in METHODS:
        raise UserError(f"expected one of {', '.join(METHODS)}, got {method!r}", field="METHOD")
    if objective not in OBJECTIVES:
        raise UserError(f"expected one of {', '.join(OBJECTIVES)}, got {objective!r}", field="objective")
    if objective != "sft" and method == "ptuning_v2":
        raise UserError("preference training (preference/train_dpo.py) trains LoRA or all weights, not P-tuning v2",
                        field="objective")
    if load_in_8bit and quantization_bit not in (None, 8):
        raise UserError(f"--load_in_8bit and --quantization_bit {quantization_bit} contradict each other",
                        field="quantization_bit")
    bits = 8 if load_in_8bit else quantization_bit
    if bits not in (None, 4, 8):
        raise UserError(f"expected 4 or 8, got {bits}", field="quantization_bit")
    if bits and method == "sft":
        raise UserError(f"{bits}-bit weights cannot be fully fine-tuned; use lora or ptuning_v2",
                        field="load_in_8bit" if load_in_8bit else "quantization_bit")
    if zero_stage and method != "sft":
        raise UserError("ZeRO partitioning is modelled for sft only (adapters are tiny)", field="zero_stage")
    if num_gpus < 1 or batch_size < 1 or seq_len < 1 or not 0 <= zero_stage <= 3:
        raise UserError("num_gpus, batch_size and seq_len must be ≥ 1 and zero_stage 0–3", field="options")
    wbytes = DTYPE_BYTES[dtype]
    params = count_parameters(arch)
    prefix = prefix_length if method == "ptuning_v2" else 0
    if method == "lora":
        targets = lora_targets or list(default_lora_targets(arch))
        trainable = lora_parameters(arch, lora_rank, targets)
    elif method == "ptuning_v2":
        trainable = prefix_length * 2 * arch.layers * arch.kv_width  # keys and values of every layer
    else:
        trainable = params["total"]

    if bits:
        weights = layer_linear_bytes(arch, bits) + params["other"] * wbytes
    else:
        weights = params["total"] * wbytes
    if method == "sft":
        grads = params["total"] * wbytes
        optimizer = params["total"] * (12 if optimizer_states == "fp32" else 2 * wbytes)
        shards = num_gpus if zero_stage else 1
        optimizer /= shards if zero_stage >= 1 else 1
        grads /= shards if zero_stage >= 2 else 1
        if zero_stage == 3:
            per_layer = (params["layer_linear"] / arch.layers) * wbytes
            weights = weights / shards + 2 * per_layer
    else:
        weights += trainable * 4
        grads = trainable * 4
        optimizer = trainable * 8
    act_bytes = 4 if dtype == "fp32" else 2
    rows = 2 * batch_size if objective in ("dpo", "orpo") else batch_size  # chosen + rejected in one batch
    acts = activation_bytes(arch, batch=rows, seq=seq_len, prefix=prefix, act_bytes=act_bytes,
                            checkpointing=gradient_checkpointing, attention=attention or arch.attention)
    parts = {"weights": weights, "gradients": grads, "optimizer_states": optimizer,
             "activations": acts["layers"], "logits_and_loss": acts["logits"], "cuda_overhead": overhead_mib * MIB}
    if objective != "sft":
        parts["logits_and_loss"] = preference_head_bytes(arch, objective, rows, seq_len, act_bytes,
                                                         output_layer_trains=method == "sft")
        full_reference = method == "sft" and objective != "orpo"
        reference = params["total"] * wbytes / (num_gpus if zero_stage == 3 else 1) if full_reference else 0
        parts = {"weights": weights, "reference_weights": reference, **{k: v for k, v in parts.items()
                                                                         if k != "weights"}}
    return {"parts": parts, "total": sum(parts.values()), "parameters": params["total"], "trainable": trainable}


def preference_head_bytes(arch: Arch, objective: str, rows: int, seq: int, act_bytes: int,
                          output_layer_trains: bool) -> int:
    """Output layer and loss of a preference step (module docstring): TRL's fused LM head, or ORPO's full logits."""
    logits = rows * seq * arch.vocab
    if objective == "orpo":
        return 2 * act_bytes * logits + 2 * act_bytes * logits // 2
    tokens = rows * seq
    head = min(tokens, FUSED_TOKENS) * min(arch.vocab, FUSED_VOCAB) * act_bytes + tokens * arch.hidden * (act_bytes + 4)
    return head + (4 * arch.vocab * arch.hidden if output_layer_trains and act_bytes < 4 else 0)


def default_lora_targets(arch: Arch) -> tuple[str, ...]:
    """The original recipe's targets on our layout (model_hub.registry)."""
    from .registry import get_family

    return get_family(arch.family).lora_targets


def render(result: dict, settings: dict) -> str:
    lines = [f"{settings['model']} · {settings['method']} · " + ", ".join(
        f"{k} {v}" for k, v in settings.items() if k not in ("model", "method")),
        f"parameters {result['parameters']:,}; trainable {result['trainable']:,}", "",
        f"{'part':<18}{'MiB':>12}{'GB':>10}"]
    for name, value in list(result["parts"].items()) + [("total per GPU", result["total"])]:
        lines.append(f"{name:<18}{value / MIB:>12,.0f}{value / 1e9:>10.2f}")
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage block becomes one line, still exit code 2
        raise UserError(message, field="arguments")


TABLE_ROWS = (("LoRA", "lora", None), ("QLoRA 4-bit", "lora", 4), ("full", "sft", None))


def table_rows(options: dict) -> list[dict]:
    """MODEL "all": the three real models × LoRA, QLoRA 4-bit, full fine-tuning, with the other options as given."""
    rows = []
    for model in REAL_MODELS:
        arch, _ = load_arch(model)
        for label, method, bits in TABLE_ROWS:
            keep = {k: v for k, v in options.items() if k not in ("load_in_8bit", "quantization_bit", "lora_targets")
                    and not (k == "zero_stage" and method != "sft")}
            result = estimate(arch, method, quantization_bit=bits, **keep)
            rows.append({"model": model, "method": label, **{k: v / MIB for k, v in result["parts"].items()},
                         "total": result["total"] / MIB})
    return rows


def render_table(rows: list[dict], options: dict) -> str:
    parts = [k for k in rows[0] if k not in ("model", "method", "total")]
    shown = {k: v for k, v in options.items() if v is not None and k not in ("lora_targets", "load_in_8bit",
                                                                               "quantization_bit", "prefix_length")}
    lines = [", ".join(f"{k} {v}" for k, v in shown.items()) + " (MiB)",
             "| model | method | " + " | ".join(parts) + " | total GB |", "|---|---|" + "---:|" * (len(parts) + 1)]
    for row in rows:
        cells = " | ".join(f"{row[k]:,.0f}" for k in parts)
        lines.append(f"| {row['model']} | {row['method']} | {cells} | {row['total'] * MIB / 1e9:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineParser(prog="python -m model_hub.estimate_memory", description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="registered name or config.json / model folder; all: the table of the three "
                                      "real models")
    parser.add_argument("method", choices=METHODS, nargs="?", help="required unless MODEL is all")
    parser.add_argument("--objective", choices=OBJECTIVES, default="sft",
                        help="sft, or preference training: dpo, orpo, kto (batch_size = pairs / completions)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="weights and activations")
    parser.add_argument("--batch_size", type=int, default=1, help="micro batch per GPU")
    parser.add_argument("--seq_len", type=int, default=512, help="tokens per sequence (the padded length)")
    parser.add_argument("--gradient_checkpointing", type=parse_bool, default=False)
    parser.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3])
    parser.add_argument("--num_gpus", type=int, default=1, help="GPUs that ZeRO partitions over")
    parser.add_argument("--load_in_8bit", action="store_true", help="bitsandbytes int8 base (lora/ptuning_v2)")
    parser.add_argument("--quantization_bit", type=int, choices=[4, 8], default=None,
                        help="QLoRA base: 4 = nf4 + double quantization, 8 = LLM.int8 (lora/ptuning_v2)")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_targets", default=None, help="comma-separated module names (default: the recipe's)")
    parser.add_argument("--prefix_length", type=int, default=128, help="P-tuning v2 virtual tokens")
    parser.add_argument("--optimizer_states", choices=["fp32", "model"], default="fp32",
                        help="sft: fp32 master + moments (12 B/param) or moments in --dtype (no master)")
    parser.add_argument("--attention", choices=["eager", "sdpa"], default=None,
                        help="default: the original code's (from the config; ChatGLM-6B and LLaMA eager)")
    parser.add_argument("--overhead_mib", type=float, default=600, help="CUDA context and workspaces")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    options = dict(objective=args.objective, dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len,
                   gradient_checkpointing=args.gradient_checkpointing, zero_stage=args.zero_stage,
                   num_gpus=args.num_gpus, load_in_8bit=args.load_in_8bit, quantization_bit=args.quantization_bit,
                   lora_rank=args.lora_rank, lora_targets=args.lora_targets.split(",") if args.lora_targets else None,
                   prefix_length=args.prefix_length, optimizer_states=args.optimizer_states,
                   attention=args.attention, overhead_mib=args.overhead_mib)
    if args.model == "all":
        rows = table_rows(options)
        print(json.dumps(rows, indent=2) if args.json else render_table(rows, options))
        return rows
    if args.method is None:
        raise UserError("give METHOD (lora, ptuning_v2 or sft), or MODEL all for the table", field="METHOD")
    arch, path = load_arch(args.model)
    settings = {"model": args.model, "method": args.method, "objective": args.objective, "dtype": args.dtype,
                "batch_size": args.batch_size, "seq_len": args.seq_len,
                "gradient_checkpointing": args.gradient_checkpointing, "zero_stage": args.zero_stage,
                "num_gpus": args.num_gpus, "quantization_bit": 8 if args.load_in_8bit else args.quantization_bit}
    if args.method == "lora":
        settings.update(lora_rank=args.lora_rank, lora_targets=args.lora_targets or ",".join(default_lora_targets(arch)))
    if args.method == "ptuning_v2":
        settings["prefix_length"] = args.prefix_length
    result = estimate(arch, args.method, **options)
    if args.json:
        print(json.dumps({"settings": settings, "config": path, "arch": asdict(arch), **result,
                          "total_mib": result["total"] / MIB}, indent=2))
    else:
        print(render(result, settings))
    return result


if __name__ == "__main__":
    run_main(main)

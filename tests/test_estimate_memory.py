"""model_hub.estimate_memory: exact parameter arithmetic on the real configs, the activation model's behaviour,
and the CLI's one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

import model_hub
from model_hub import estimate_memory as em
from tuning.errors import UserError
from conftest import REPO



def real_config(name):
    with open(os.path.join(model_hub.tokenizer_files(name), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def meta_model(name):
    """Our/transformers' implementation of the real config on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from model_hub.chatglm6b import ChatGLMConfig, ChatGLMForConditionalGeneration
    from model_hub.glm4.native import native_config_from_original

    with torch.device("meta"):
        if name == "chatglm-6b":
            return ChatGLMForConditionalGeneration(ChatGLMConfig(**real_config(name)))
        if name == "glm-4-9b-chat":
            return AutoModelForCausalLM.from_config(native_config_from_original(real_config(name)))
        return LlamaForCausalLM(LlamaConfig(**real_config(name)))


@pytest.mark.parametrize("name,expected", [("chatglm-6b", 6_173_286_400), ("glm-4-9b-chat", 9_399_951_360),
                                           ("llama-7b", 6_738_415_616), ("chinese-alpaca-7b", 6_885_494_784)])
def test_parameter_count_equals_the_meta_device_model(name, expected):
    arch, _ = em.load_arch(name)
    counts, model = em.count_parameters(arch), meta_model(name)
    assert counts["total"] == expected == sum(p.numel() for p in model.parameters())
    # 8-bit split: every Linear weight inside the decoder layers is int8, the rest 16-bit
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert counts["layer_linear"] == linear


def test_trainable_parameters_of_the_original_recipes():
    glm4, _ = em.load_arch("glm-4-9b-chat")
    # r 8 on q/k/v_proj, what our recipe trains (README Deviations: 5,406,720; the original's fused
    # query_key_value had 2,785,280, which the estimator used to count).
    assert em.estimate(glm4, "lora")["trainable"] == 5_406_720
    assert em.estimate(glm4, "ptuning_v2", prefix_length=512)["trainable"] == 10_485_760
    chatglm, _ = em.load_arch("chatglm-6b")
    assert em.estimate(chatglm, "lora")["trainable"] == 3_670_016
    llama, _ = em.load_arch("chinese-alpaca-7b")
    assert em.estimate(llama, "lora")["trainable"] == 19_988_480          # q,k,v,o,gate,up,down


def test_weights_gradients_optimizer_arithmetic():
    arch, _ = em.load_arch("chatglm-6b")
    n = 6_173_286_400
    full = em.estimate(arch, "sft", dtype="bf16")["parts"]
    assert (full["weights"], full["gradients"], full["optimizer_states"]) == (2 * n, 2 * n, 12 * n)
    pure = em.estimate(arch, "sft", dtype="bf16", optimizer_states="model")["parts"]
    assert pure["optimizer_states"] == 4 * n
    z3 = em.estimate(arch, "sft", dtype="bf16", zero_stage=3, num_gpus=8)["parts"]
    layer = (4 * 4096**2 + 2 * 4096 * 16384) * 2  # one layer's linear weights, bf16
    assert (z3["weights"], z3["gradients"], z3["optimizer_states"]) == (2 * n / 8 + 2 * layer, 2 * n / 8, 12 * n / 8)
    z1 = em.estimate(arch, "sft", dtype="bf16", zero_stage=1, num_gpus=8)["parts"]
    assert (z1["weights"], z1["gradients"], z1["optimizer_states"]) == (2 * n, 2 * n, 12 * n / 8)
    lora = em.estimate(arch, "lora", dtype="fp16", load_in_8bit=True)["parts"]
    t = 3_670_016
    other = n - 28 * (4 * 4096**2 + 2 * 4096 * 16384)
    row_scales = 28 * 4 * (3 * 4096 + 4096 + 16384 + 4096)  # one fp32 per output row of each int8 layer
    assert lora["weights"] == (n - other) + row_scales + 2 * other + 4 * t
    assert (lora["gradients"], lora["optimizer_states"]) == (4 * t, 8 * t)


def test_4bit_weights_of_llama_7b_by_hand():
    """QLoRA's base, counted by hand for the real LLaMA-7B config (32 layers, h 4096, f 11008, vocab 32000)."""
    arch, _ = em.load_arch("llama-7b")

    def nf4(n):  # packed codes + uint8 absmax per 64 + fp32 scale per 256 absmax + offset + code tables (16, 256)
        blocks = n // 64
        return n // 2 + blocks + 4 * -(-blocks // 256) + 4 + 4 * 16 + 4 * 256

    attention, mlp = 4096 * 4096, 4096 * 11008
    assert nf4(attention) == 8_388_608 + 262_144 + 4_096 + 1_092
    assert nf4(mlp) == 22_544_384 + 704_512 + 11_008 + 1_092
    quantized = 32 * (4 * nf4(attention) + 3 * nf4(mlp))
    other = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings + lm_head, norms: bf16
    lora = em.estimate(arch, "lora", dtype="bf16", quantization_bit=4)
    trainable = 32 * 8 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert lora["trainable"] == trainable
    assert lora["parts"]["weights"] == quantized + 2 * other + 4 * trainable
    assert quantized == 32 * (4 * 8_655_940 + 3 * 23_260_996) == 3_341_015_936 and quantized / (2 * 32 * (4 * attention + 3 * mlp)) < 0.3


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_bytes_equal_a_real_bitsandbytes_layer(bits):
    """The per-layer formula against the tensors bitsandbytes really keeps (CPU), for an odd-sized layer."""
    import bitsandbytes as bnb

    n_in, n_out = 320, 200  # 64,000 weights: 1,000 blocks → 4 fp32 scales
    weight = torch.randn(n_out, n_in, dtype=torch.bfloat16)
    if bits == 4:
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
        layer = layer.to("cpu")
        state = layer.weight.quant_state
        tensors = [layer.weight.data, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    else:
        layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer = layer.to("cpu")
        tensors = [layer.weight.data, layer.weight.SCB]
    assert sum(t.numel() * t.element_size() for t in tensors) == em.quantized_bytes(n_in, n_out, bits)


def test_activation_model_behaves():
    arch, _ = em.load_arch("glm-4-9b-chat")

    def acts(**kw):
        settings = dict(batch=1, seq=512, prefix=0, act_bytes=2, checkpointing=False, attention="eager") | kw
        return em.activation_bytes(arch, **settings)

    assert acts(batch=4)["layers"] == 4 * acts()["layers"] and acts(batch=4)["logits"] == 4 * acts()["logits"]
    assert acts(checkpointing=True)["layers"] < acts()["layers"] / 10
    assert acts(attention="sdpa")["layers"] < acts()["layers"]
    assert acts(prefix=512)["layers"] > acts()["layers"]
    # hand-computed: one bf16 layer with SDPA, b 1, s 512: 6·s·h + 2·s·k + 3·s·f elements, + 4 B log-sum-exp per head
    s, h, k, f = 512, 4096, 256, 13696
    assert acts(attention="sdpa")["one_layer"] == 2 * (6 * s * h + 2 * s * k + 3 * s * f) + 4 * 32 * s
    assert acts()["logits"] == 512 * 151552 * 14


def test_cli_json_output(capsys):
    result = em.main(["glm-4-9b-chat", "lora", "--seq_len", "1025", "--gradient_checkpointing", "true", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["parameters"] == 9_399_951_360 and printed["total"] == result["total"]
    assert set(printed["parts"]) == {"weights", "gradients", "optimizer_states", "activations", "logits_and_loss",
                                     "cuda_overhead"}
    assert printed["total"] == sum(printed["parts"].values())


@pytest.mark.parametrize("argv,message", [
    (["no-such-model", "lora"], "not a registered model"),
    (["chatglm-6b", "dpo"], "invalid choice: 'dpo'"),
    (["chatglm-6b", "lora", "--lora_targets", "q_proj"], "lora_targets: unknown module(s) q_proj"),
    (["chatglm-6b", "sft", "--load_in_8bit"], "cannot be fully fine-tuned"),
    (["glm-4-9b-chat", "sft", "--quantization_bit", "4"], "quantization_bit: 4-bit weights cannot be fully fine-tuned"),
    (["llama-7b", "lora", "--load_in_8bit", "--quantization_bit", "4"], "contradict each other"),
    (["chatglm-6b", "lora", "--zero_stage", "3"], "modelled for sft only"),
    (["chatglm-6b", "lora", "--batch_size", "0"], "must be ≥ 1"),
])
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    from tuning.errors import run_main

    with pytest.raises(SystemExit) as exc:
        run_main(lambda: em.main(argv), argv=list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_bad_config_file_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}), encoding="utf-8")
    with pytest.raises(UserError, match="model_type 'gpt2' not supported"):
        em.load_arch(str(tmp_path))
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}), encoding="utf-8")
    with pytest.raises(UserError, match="config.json: config lacks 'num_attention_heads'"):
        em.load_arch(str(path))


def test_cli_help_explains_the_assumptions(capsys):
    with pytest.raises(SystemExit) as exc:
        em.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "activations" in out and "--zero_stage" in out and "overhead" in out


def test_cli_subprocess_exit_code():
    result = subprocess.run([sys.executable, "-m", "model_hub.estimate_memory", "chatglm-6b", "lora", "--seq_len", "x"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--seq_len" in result.stderr

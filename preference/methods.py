"""What train_dpo.py trains and with which TRL trainer: the policy (LoRA / QLoRA / full), its reference, the config
of each loss and the saved result.

    loss          trainer (TRL 1.16)                    reference
    DPO losses    DPOTrainer(loss_type=[…])             LoRA: the adapter disabled (new LoRA) or a frozen copy of the
    kto           KTOTrainer (unpaired rows)            SFT adapter ("ref"); full: a frozen copy of the start weights
    orpo          experimental ORPOTrainer              none (reference-free)
    simpo         experimental CPOTrainer(simpo)        none (reference-free)
"""
import copy

from tuning.errors import UserError

REFERENCE_FREE = ("orpo", "simpo")
DEFAULT_BETA = {"simpo": 2.0}  # SimPO paper's β (TRL's CPOConfig default 0.1 is CPO's); every other loss: 0.1


def check_method(args) -> None:
    """--finetuning_type × quantization × ZeRO stage × precision by tuning.run_plan's rules, as the SFT recipes;
    sets args.zero_stage (None: no DeepSpeed)."""
    import torch

    from model_hub.loader import quantization_bits
    from tuning.distributed import zero_stage
    from tuning.run_plan import check_combination

    if args.finetuning_type not in ("lora", "full"):
        raise UserError(f"expected lora or full, got {args.finetuning_type!r}", field="finetuning_type")
    args.zero_stage = zero_stage(args.deepspeed) if args.deepspeed else None
    check_combination(method=args.finetuning_type, bits=quantization_bits(args.quantization_bit),
                      zero_stage=args.zero_stage, bf16=args.bf16, use_cpu=not torch.cuda.is_available())
    if args.beta is None:
        args.beta = DEFAULT_BETA.get(args.loss_type, 0.1)


def load_policy(args, model_dir: str, bits):
    """(model, tokenizer, peft_config). LoRA: a recipe's adapter made trainable again, or the base and a new LoRA's
    config (for DPO/KTO TRL wraps it, so the reference is the base with the adapter disabled). Full: every weight
    trains (a recipe's adapter merged into its base first)."""
    from model_hub.loader import load_adapted
    from model_hub.registry import family_of_config, get_family
    from peft import LoraConfig, TaskType
    from tuning.distributed import local_device
    from tuning.methods import prepare_quantized_base

    model, tokenizer = load_adapted(model_dir, args.adapter, dtype="fp32", device=str(local_device()),
                                    quantization_bit=bits, base_flag="--model_dir")
    model.train()
    model.config.use_cache = False
    if args.finetuning_type == "full":
        if args.adapter:
            model = model.merge_and_unload()  # the SFT model, as one set of weights
            model.train()
        for param in model.parameters():
            param.requires_grad_(True)
        return model, tokenizer, None
    if args.adapter:
        model.peft_config["default"].inference_mode = False
        for name, param in model.named_parameters():
            param.requires_grad_(".lora_" in name and ".default." in name)
        return model, tokenizer, None
    if bits:
        prepare_quantized_base(model)
    lora = get_family(family_of_config(model.config)).lora()
    return model, tokenizer, LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.lora_r, lora_alpha=lora["alpha"],
                                        lora_dropout=lora["dropout"], target_modules=list(lora["target_modules"]))


def trainer_config(args, on_gpu: bool):
    from trl import DPOConfig, KTOConfig

    from tuning import distributed

    common = dict(
        output_dir=args.save_dir, learning_rate=args.learning_rate, per_device_train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, save_strategy="steps", save_steps=args.save_steps, logging_steps=args.log_steps,
        save_total_limit=args.save_total_limit, seed=args.seed, bf16=args.bf16, fp16=False, use_cpu=not on_gpu,
        beta=args.beta, max_length=args.max_length, activation_checkpointing=False, report_to=["tensorboard"],
        dataloader_num_workers=0, deepspeed=args.deepspeed,
    )
    common = distributed.trainer_arguments(common)
    if args.loss_type == "kto":
        return KTOConfig(**common, pad_to_multiple_of=None, train_sampling_strategy="sequential")  # KL rows per batch
    if args.loss_type in REFERENCE_FREE:
        from preference.reference_free import CPOConfig, ORPOConfig

        if args.loss_type == "orpo":
            return ORPOConfig(**common, remove_unused_columns=False)
        return CPOConfig(**common, remove_unused_columns=False, loss_type="simpo", simpo_gamma=args.simpo_gamma,
                         cpo_alpha=0.0)
    return DPOConfig(**common, pad_to_multiple_of=None, loss_type=[args.loss_type])


def build_trainer(args, model, tokenizer, peft_config, dataset, on_gpu: bool, callbacks):
    """The loss's trainer (module table). Full fine-tuning with DPO/KTO: the reference is a frozen copy of the start
    weights, made here before training touches them. ORPO/SimPO: a new LoRA is put on here (TRL's own wrapping would
    run peft's prepare_model_for_kbit_training on a quantized base, which tuning.methods avoids on purpose)."""
    from preference.trainers import PreferenceDPOTrainer, PreferenceKTOTrainer
    from tuning.patches import fused_lm_head_scores_answer_positions_only_on_cpu

    fused_lm_head_scores_answer_positions_only_on_cpu()
    config = trainer_config(args, on_gpu)
    kwargs = dict(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    if args.loss_type in REFERENCE_FREE:
        from peft import get_peft_model

        from preference.reference_free import PreferenceORPOTrainer, PreferenceSimPOTrainer

        if peft_config is not None:
            kwargs["model"] = get_peft_model(model, peft_config)
        return (PreferenceORPOTrainer if args.loss_type == "orpo" else PreferenceSimPOTrainer)(**kwargs)
    if args.finetuning_type == "full":
        kwargs["ref_model"] = frozen_copy(model)
    return (PreferenceKTOTrainer if args.loss_type == "kto" else PreferenceDPOTrainer)(peft_config=peft_config,
                                                                                         **kwargs)


def frozen_copy(model):
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def save_result(trainer, tokenizer, args, prompt_format: str) -> None:
    """Into save_dir, each file whole: LoRA — the adapter (TRL's frozen "ref" copy left out) and the tokenizer; full —
    the model's weights and config with the tokenizer (Trainer.save_model, staged). Both: prompt_format.json.
    Collective under a launcher: ZeRO-3's shards are gathered on every rank, rank 0 writes (tuning.distributed)."""
    from model_hub.prompt_format import record_prompt_format
    from tuning.checkpoints import save_pretrained_atomically
    from tuning.distributed import is_main, save_trainable

    if args.finetuning_type == "full":
        trainer.save_model()
    else:
        save_trainable(trainer.model, lambda model: save_pretrained_atomically(
            lambda folder: (model.save_pretrained(folder, selected_adapters=["default"]),
                            tokenizer.save_pretrained(folder)), args.save_dir))
    if is_main():
        record_prompt_format(args.save_dir, prompt_format, "preference")

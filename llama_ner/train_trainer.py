"""LoRA fine-tuning of Chinese-Alpaca-7B on MSRA NER instructions with the HF Trainer (the original's
train_trainer.py).

    deepspeed llama_ner/train_trainer.py                          # GPU, as the original README (deepspeed.json)
    python llama_ner/train_trainer.py --model_dir=tiny:chinese-alpaca-7b --train_batch_size=4 --max_steps=30 \\
        --learning_rate=2e-3 --save_dir=build/llama-ner/train_trainer/        # CPU smoke run, plain Trainer

Options are the original's config keys, given as --key=value (nested keys joined by "_"); --help lists them.
Launched by `deepspeed` (which passes --local_rank) the Trainer runs DeepSpeed with deepspeed_jaon_path (sic,
the original's key); otherwise it is a plain Trainer (torchrun → DDP). LoRA r=lora_r, alpha 32, dropout 0.1 on
q/k/v/o/gate/up/down. Optimizer as deepspeed.json: Adam(W) lr 1e-5, betas (0.9, 0.95), weight decay 5e-4, linear
decay, no warmup. Writes save_dir/adapter_model/train_args.json first (test.py and predict.py read it), real
checkpoints save_dir/checkpoint-N (adapter + optimizer + scheduler + RNG: --resume_from_checkpoint=last resumes
exactly), and the adapter to save_dir/adapter_model at every save and at the end. CPU: fp32, or --bf16=true.
"""
import os


import tuning  # noqa: F401  (first: silences library lines no user can act on, before those load)
import torch

from llama_ner.common import (BASE_CONFIG, EXTRA_CONFIG, HELP, SPELLING, adapter_dir, check_settings,
                              check_speed_flags, check_values, deepspeed_config, find_deepspeed_json, learning_rate,
                              load_for_lora, load_training_rows, resolve_data_paths, save_adapter, show_args,
                              training_inputs, write_train_args)
from llama_ner.config_utils import ConfigParser
from llama_ner.dataset import load_data
from model_hub.registry import get_family
from tuning import distributed
from tuning.errors import run_main
from tuning.methods import apply_lora
from tuning.run_plan import add_method, claim_output, plan_run, training_callbacks

CONFIG = {**BASE_CONFIG, "deepspeed_jaon_path": "deepspeed.json", **EXTRA_CONFIG}


def adapter_to_save_dir(folder: str):
    """The original's PeftSavingCallback: the adapter in save_dir/adapter_model at every save and at the end.
    Runs on every rank (ZeRO-3 gathers the LoRA shards collectively); rank 0 writes."""
    # built when training starts: transformers' Trainer stack (peft, bitsandbytes) loads after the arguments' checks
    from transformers import TrainerCallback

    class AdapterToSaveDir(TrainerCallback):
        def __init__(self, folder: str):
            self.folder = folder

        def on_save(self, args, state, control, model=None, **kwargs):
            save_adapter(model, self.folder)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            save_adapter(model, self.folder)

    return AdapterToSaveDir(folder)


def main():
    args = ConfigParser(CONFIG, help_text=__doc__, help_keys=HELP).parse_main()
    show_args(args)
    on_gpu = torch.cuda.is_available()
    use_deepspeed = args.local_rank != -1
    check_values(args)
    check_speed_flags(args, on_gpu)
    ds_config = deepspeed_config(find_deepspeed_json(args.deepspeed_jaon_path), args, on_gpu)  # lr, fp16 from it
    bits, stage = check_settings(args, ds_config if use_deepspeed else None, on_gpu)
    resolve_data_paths(args, CONFIG, ("train_path",))
    run = plan_run(output_dir=args.save_dir, method="lora", bits=bits, zero_stage=stage,
                   resume=args.resume_from_checkpoint,
                   max_steps=args.max_steps, num_train_epochs=args.num_train_epochs, seed=args.seed,
                   inputs=[args.train_path], overwrite=args.overwrite_output_dir, spelling=SPELLING)
    load_data(args.train_path, (args.instruct_column, args.query_column, args.response_column))  # fail fast

    from transformers import TrainingArguments

    from model_hub.loader import load_tokenizer, resolve_model_path
    from tuning.checkpoints import AtomicTrainer

    tokenizer = load_tokenizer(args.model_dir)
    train_data = load_training_rows(args, tokenizer)
    distributed.say(f"train rows: {len(train_data)}")
    claim_output(run, resolve_model_path(args.model_dir))
    if distributed.is_main():
        write_train_args(args, adapter_dir(args))

    # fp32 master weights; the GPU run gets fp16 mixed precision from deepspeed.json, the CPU run bf16 autocast.
    model, tokenizer = load_for_lora(args, run, dtype="fp32")
    model = add_method(run, model, lambda base: apply_lora(base, r=args.lora_r, **get_family("llama").lora()))

    training_rows = training_inputs(args, tokenizer, model, train_data)
    fp16 = on_gpu and not args.bf16 and bool(ds_config.get("fp16", {}).get("enabled"))  # as the original on a GPU
    training_args = TrainingArguments(**distributed.trainer_arguments(dict(
        output_dir=args.save_dir, learning_rate=learning_rate(args, ds_config), adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, weight_decay=0.0005, fp16=fp16, bf16=args.bf16, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, save_strategy="steps",
        save_steps=args.save_steps, logging_steps=args.log_steps, save_total_limit=args.save_total_limit,
        seed=args.seed, remove_unused_columns=False, report_to=["tensorboard"],
        deepspeed=ds_config if use_deepspeed else None,
    )))
    trainer = AtomicTrainer(model=model, args=training_args, callbacks=[
        adapter_to_save_dir(adapter_dir(args)), *training_callbacks(model)], **training_rows.trainer_inputs())
    trainer.resume_hint = SPELLING.resume
    trainer.train(resume_from_checkpoint=run.resume)
    distributed.say(f"adapter: {adapter_dir(args)}")
    distributed.say(f"loss curve: {os.path.join(args.save_dir, 'loss.png')}")
    return trainer


if __name__ == "__main__":
    run_main(main)

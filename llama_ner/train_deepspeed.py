"""LoRA fine-tuning with the raw DeepSpeed engine loop (the original's train_deepspeed.py).

    deepspeed --num_gpus 1 llama_ner/train_deepspeed.py                  # GPU: fp16, ZeRO-1, optimizer offload
    torchrun --nproc_per_node 1 llama_ner/train_deepspeed.py --model_dir=tiny:chinese-alpaca-7b \\
        --train_batch_size=4 --max_steps=10 --learning_rate=2e-3 --save_dir=runs/llama_ner/train_deepspeed/

Options are the original's config keys as --key=value (--help lists them). The DeepSpeed config is the
original's deepspeed.json built in code (Adam lr 1e-5, betas (0.9, 0.95), weight decay 5e-4, fp16, ZeRO-1 with
the optimizer offloaded to the CPU) plus this run's micro batch, gradient accumulation and steps_per_print=log_steps.
Per step: forward, engine.backward, engine.step; the loss is printed every log_steps optimizer steps and the
adapter saved to save_dir (with train_args.json) every save_steps steps and at the end. On a CPU: fp32 (or
--bf16=true), no optimizer offload, torch's Adam. The first DeepSpeed run on a CPU JIT-compiles a comm op (~60 s,
cached in ~/.cache/torch_extensions).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llama_ner.common import (BASE_CONFIG, EXTRA_CONFIG, HELP, LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS,  # noqa: E402
                              deepspeed_config, find_deepspeed_json, load_training_rows, save_adapter,
                              show_args, training_inputs, write_train_args)
from llama_ner.config_utils import ConfigParser  # noqa: E402
from llama_ner.dataset import load_data  # noqa: E402
from tuning.errors import TrainingStopped, UserError, run_main  # noqa: E402
from tuning.methods import apply_lora, trainable_summary  # noqa: E402

CONFIG = {**BASE_CONFIG, "save_dir": "./checkpoint/msra/train_deepspeed/adapter_model/", **EXTRA_CONFIG}
for _key in ("save_total_limit", "resume_from_checkpoint"):  # Trainer-only options
    CONFIG.pop(_key)


def main():
    args = ConfigParser(CONFIG, help_text=__doc__, help_keys=HELP).parse_main()
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        raise UserError("launch with `deepspeed --num_gpus 1 llama_ner/train_deepspeed.py …` or `torchrun "
                        "--nproc_per_node 1 llama_ner/train_deepspeed.py …` (DeepSpeed needs a launcher)",
                        field="launcher")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        show_args(args)
    on_gpu = torch.cuda.is_available()
    if args.bf16 and on_gpu:
        raise UserError("bf16 is the CPU option here; on a GPU the original's fp16 from deepspeed.json is used",
                        field="bf16")
    conf = deepspeed_config(find_deepspeed_json("deepspeed.json"), args, on_gpu)
    conf["steps_per_print"] = args.log_steps
    conf["gradient_clipping"] = 1.0  # the original clipped model grads by hand; DeepSpeed clips unscaled grads
    load_data(args.train_path, (args.instruct_column, args.query_column, args.response_column))  # fail fast

    from model_hub.loader import load_model_and_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(args.model_dir)
    train_data = load_training_rows(args, tokenizer)
    if rank0:
        write_train_args(args, args.save_dir)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model_dir, dtype="fp16" if on_gpu else "fp32")
    model.config.use_cache = False
    model = apply_lora(model, LORA_TARGETS, r=args.lora_r, alpha=LORA_ALPHA, dropout=LORA_DROPOUT)
    if rank0:
        print(trainable_summary(model))

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    world = torch.distributed.get_world_size()
    generator = torch.Generator().manual_seed(args.seed)
    train_data, collate_fn, sampler = training_inputs(args, tokenizer, model, train_data,
                                                      rank=torch.distributed.get_rank(), world=world)
    if sampler is None and world > 1:  # (with --group_by_length each process takes its share of the batches)
        sampler = torch.utils.data.DistributedSampler(train_data, shuffle=True, seed=args.seed, drop_last=True)
    elif sampler is None:
        sampler = RandomSampler(train_data, generator=generator)
    loader = DataLoader(train_data, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate_fn)
    if len(loader) == 0:
        raise UserError(f"fewer rows ({len(train_data)}) than one batch", field="train_batch_size")
    engine, _, _, _ = deepspeed.initialize(config=conf, model=model,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    total_step = len(loader) * args.num_train_epochs // args.gradient_accumulation_steps
    if args.max_steps > 0:
        total_step = min(total_step, args.max_steps)

    global_step = saved_step = 0
    bar = tqdm(total=total_step, desc="training", disable=not rank0)
    engine.train()
    for epoch in range(args.num_train_epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            if not torch.isfinite(loss):
                hint = ("fp16 overflow is the usual cause: use --bf16=true on a CPU, or lower the learning rate"
                        if conf.get("fp16", {}).get("enabled") else "lower the learning rate or check the data")
                saved = (f"the adapter saved at step {saved_step} in {args.save_dir} is intact" if saved_step
                         else "no adapter was saved yet")
                raise TrainingStopped(f"non-finite loss at step {global_step + 1}; {hint}. Weights were not "
                                      f"updated; {saved}")
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            engine.step()
            if not boundary:
                continue
            global_step += 1
            bar.update(1)
            if global_step % args.log_steps == 0 and rank0:
                tqdm.write("loss:{}, global_step:{}/{}".format(loss.item(), global_step, total_step))
            if global_step % args.save_steps == 0:
                if rank0:
                    save_adapter(engine.module, args.save_dir)
                saved_step = global_step
            if global_step >= total_step:
                break
        if global_step >= total_step:
            break
    bar.close()
    if rank0:
        save_adapter(engine.module, args.save_dir)
        print(f"adapter: {args.save_dir}")


if __name__ == "__main__":
    run_main(main)

"""LoRA fine-tuning with the raw DeepSpeed engine loop (the original's train_deepspeed.py).

    deepspeed --num_gpus 1 llama_ner/train_deepspeed.py                  # GPU: fp16, ZeRO-1, optimizer offload
    torchrun --nproc_per_node 1 llama_ner/train_deepspeed.py --model_dir=tiny:chinese-alpaca-7b \\
        --train_batch_size=4 --max_steps=10 --learning_rate=2e-3 --save_dir=build/llama-ner/train_deepspeed/

Options are the original's config keys as --key=value (--help lists them). The DeepSpeed config is the
original's deepspeed.json (Adam lr 1e-5, betas (0.9, 0.95), weight decay 5e-4, fp16, ZeRO-1 with the optimizer
offloaded to the CPU; another file with --deepspeed_jaon_path, e.g. ZeRO-2/3) plus this run's micro batch,
gradient accumulation and steps_per_print=log_steps. Per step: forward, engine.backward, engine.step; the loss is
printed every log_steps optimizer steps; every save_steps steps and at the end the adapter goes to save_dir (with
train_args.json) and DeepSpeed's own checkpoint (LoRA weights, optimizer, per-rank RNG) to
save_dir/checkpoints/global_stepN (the newest save_total_limit kept); --resume_from_checkpoint=last|N|PATH
continues from one exactly. Any number of processes (torchrun / deepspeed --num_gpus N, multi-node: README.md).
On a CPU: fp32 (or --bf16=true), no optimizer offload, torch's Adam. The first DeepSpeed run on a CPU
JIT-compiles a comm op (~60 s, cached in ~/.cache/torch_extensions).
"""
import os


import tuning  # noqa: F401  (first: silences library lines no user can act on, before those load)
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from llama_ner.common import (BASE_CONFIG, EXTRA_CONFIG, HELP, SPELLING, check_settings, check_speed_flags,
                              check_values, deepspeed_config, find_deepspeed_json, load_for_lora, load_training_rows,
                              resolve_data_paths, save_adapter, show_args, training_inputs, write_train_args)
from llama_ner.config_utils import ConfigParser
from llama_ner.dataset import load_data
from model_hub.registry import get_family
from tuning import distributed
from tuning.errors import TrainingStopped, UserError, run_main
from tuning.methods import apply_lora
from tuning.outputs import check_training_folder, refuse_output_in_model
from tuning.run_folder import claim_checkpoints, is_earlier_run, lock_output_dir
from tuning.run_plan import RunPlan, add_method

CONFIG = {**BASE_CONFIG, "save_dir": "./checkpoint/msra/train_deepspeed/adapter_model/",
          "deepspeed_jaon_path": "deepspeed.json", **EXTRA_CONFIG}
# This loop writes the adapter into save_dir itself (the original's layout), not save_dir/adapter_model.
HELP = {**HELP, "save_dir": "the adapter and train_args.json go here; DeepSpeed checkpoints in "
                            "save_dir/checkpoints/global_stepN"}


def checkpoint_root(args) -> str:
    return os.path.join(args.save_dir, "checkpoints")


def saved_steps(root: str) -> list[int]:
    from tuning.training import DEEPSPEED_CHECKPOINTS, list_checkpoints

    return [step for step, _ in list_checkpoints(root, DEEPSPEED_CHECKPOINTS)]


def resume_point(value, root: str) -> tuple[str, str] | None:
    """--resume_from_checkpoint → (folder, tag) for engine.load_checkpoint, or None to start fresh."""
    from tuning.training import DEEPSPEED_CHECKPOINTS, resolve_resume

    path = resolve_resume(value, root, names=DEEPSPEED_CHECKPOINTS)
    return None if path is None else (os.path.dirname(path), os.path.basename(path))


def resumed_step(resume: tuple[str, str]) -> int:
    """The optimizer step of a (folder, global_stepN) resume point."""
    from tuning.training import DEEPSPEED_CHECKPOINTS

    return DEEPSPEED_CHECKPOINTS.step_of(resume[1])


def save_checkpoint(engine, args, step: int, claim) -> None:
    """Collective: DeepSpeed's checkpoint of the trainable weights and optimizer, plus each rank's RNG, published as
    the Trainer recipes' checkpoints are (tuning.checkpoints.save_checkpoint_staged: written into
    save_dir/checkpoints/.saving-global_stepN, renamed to global_stepN once every rank's part is on disk, so a kill
    midway never leaves a global_stepN that resume would pick); then the oldest of this run's beyond
    save_total_limit are removed (renamed first) and DeepSpeed's `latest` file names the new one."""
    from tuning.checkpoints import rotate_folders, save_checkpoint_staged, save_failed
    from tuning.files import atomic_file

    root, tag = checkpoint_root(args), f"global_step{step}"

    def write(staging):
        engine.save_checkpoint(staging, tag=tag, client_state={"global_step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
        os.makedirs(os.path.join(staging, tag), exist_ok=True)
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save(rng, os.path.join(staging, tag, f"rng_state_{distributed.rank()}.pth"))

    def rotate_after(final, owner):  # only this run's checkpoints are rotated (tuning.run_folder)
        rotate_folders(root, [os.path.join(root, f"global_step{s}") for s in saved_steps(root)
                              if f"global_step{s}" in owner.owned], args.save_total_limit)
        with atomic_file(os.path.join(root, "latest")) as f:
            f.write(tag)

    error = save_checkpoint_staged(root, tag, write, lambda: claim, rotate_after, distributed.is_main())
    if error is not None:
        steps = saved_steps(root)
        last_good = os.path.join(root, f"global_step{steps[-1]}") if steps else None
        raise TrainingStopped(save_failed(tag, error, last_good, SPELLING.resume)) from error


def load_checkpoint(engine, folder: str, tag: str) -> int:
    from tuning.checkpoints import deepspeed_reads_weights_only

    with deepspeed_reads_weights_only():  # no pickled code runs while resuming
        _, client_state = engine.load_checkpoint(folder, tag=tag, load_module_strict=False)
    rng_file = os.path.join(folder, tag, f"rng_state_{distributed.rank()}.pth")
    if os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return int(client_state["global_step"])


def check_run(args):
    """Everything that can be refused before a model loads: launcher, precision, values, DeepSpeed config, resume,
    data paths. Returns (on_gpu, DeepSpeed config, the run's plan, resume point (folder, tag) or None)."""
    if not distributed.launched():
        raise UserError("launch with `deepspeed --num_gpus 1 llama_ner/train_deepspeed.py …` or `torchrun "
                        "--nproc_per_node 1 llama_ner/train_deepspeed.py …` (DeepSpeed needs a launcher)",
                        field="launcher")
    show_args(args)
    on_gpu = torch.cuda.is_available()
    if args.bf16 and on_gpu:
        raise UserError("bf16 is the CPU option here; on a GPU the original's fp16 from deepspeed.json is used",
                        field="bf16")
    check_values(args)
    check_speed_flags(args, on_gpu)
    conf = deepspeed_config(find_deepspeed_json(args.deepspeed_jaon_path), args, on_gpu)
    conf["steps_per_print"] = args.log_steps
    bits, stage = check_settings(args, conf, on_gpu)
    conf["gradient_clipping"] = 1.0  # the original clipped model grads by hand; DeepSpeed clips unscaled grads
    # tuning.training loads transformers' Trainer callbacks (peft, bitsandbytes): after the checks above
    from tuning.training import stop_at_end

    resume = resume_point(args.resume_from_checkpoint, checkpoint_root(args))
    if resume and args.max_steps > 0:  # a finished run changes nothing (not even train_args.json)
        stop_at_end(os.path.join(*resume), resumed_step(resume), args.max_steps, SPELLING.max_steps)
    resolve_data_paths(args, CONFIG, ("train_path",))
    run = RunPlan(args.save_dir, "lora", bits, stage, os.path.join(*resume) if resume else None, args.seed,
                  (args.train_path,), args.overwrite_output_dir, SPELLING)
    return on_gpu, conf, run, resume


def claim_output_folder(args, resume, model_dir: str):
    """The save folder checked, locked and claimed (refusals come before anything is written); train_args.json."""
    from tuning.training import DEEPSPEED_CHECKPOINTS

    def claim_own_checkpoints():
        return claim_checkpoints(checkpoint_root(args), os.path.join(*resume) if resume else None,
                                 DEEPSPEED_CHECKPOINTS, "--resume_from_checkpoint=last")

    refuse_output_in_model(args.save_dir, model_dir)
    claim_own_checkpoints()  # refused: nothing written yet
    check_training_folder(args.save_dir, inputs=[args.train_path], overwrite=args.overwrite_output_dir,
                          flag="--overwrite_output_dir=true", earlier_run=is_earlier_run)
    if distributed.is_main():
        lock_output_dir(args.save_dir)
    claim = claim_own_checkpoints()  # again, under the lock
    if distributed.is_main():
        write_train_args(args, args.save_dir)
    return claim


def data_loader(args, tokenizer, model, train_data):
    train_data, collate_fn, sampler = training_inputs(args, tokenizer, model, train_data,
                                                      rank=distributed.rank(), world=distributed.world_size())
    if sampler is None:  # (with --group_by_length each process takes its share of the batches)
        # Each rank reads its own share; the order depends on seed and epoch only (exact resume).
        sampler = DistributedSampler(train_data, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_data, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                        collate_fn=collate_fn, generator=torch.Generator().manual_seed(args.seed))  # not the global RNG
    if len(loader) == 0:
        raise UserError(f"fewer rows ({len(train_data)}) than one batch per process", field="train_batch_size")
    return loader, sampler


def stop_on_non_finite(loss, global_step: int, saved_step: int, args, conf) -> None:
    if distributed.all_ranks(bool(torch.isfinite(loss))):  # every rank stops, none waits forever
        return
    hint = ("fp16 overflow is the usual cause: use --bf16=true on a CPU, or lower the learning rate"
            if conf.get("fp16", {}).get("enabled") else "lower the learning rate or check the data")
    saved = (f"the adapter saved at step {saved_step} in {args.save_dir} is intact" if saved_step
             else "no adapter was saved yet")
    raise TrainingStopped(f"non-finite loss at step {global_step + 1}; {hint}. Weights were not updated; {saved}")


def train(engine, loader, sampler, args, conf, total_step: int, global_step: int, claim) -> None:
    """The original's loop: micro-batches skipped up to the resumed step, a log line every log_steps, the adapter and
    a checkpoint every save_steps and at the end."""
    saved_step = global_step
    bar = tqdm(total=total_step, initial=global_step, desc="training", disable=not distributed.is_main())
    engine.train()
    skip = global_step * args.gradient_accumulation_steps  # micro-batches already trained on
    for epoch in range(skip // len(loader), args.num_train_epochs):
        if global_step >= total_step:
            break
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if epoch * len(loader) + i < skip:
                continue
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            stop_on_non_finite(loss, global_step, saved_step, args, conf)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            engine.step()
            if not boundary:
                continue
            global_step += 1
            bar.update(1)
            if global_step % args.log_steps == 0 and distributed.is_main():
                tqdm.write("loss:{}, global_step:{}/{}".format(loss.item(), global_step, total_step))
            if global_step % args.save_steps == 0 or global_step == total_step:
                save_adapter(engine.module, args.save_dir)  # collective (ZeRO-3 gathers the LoRA shards)
                save_checkpoint(engine, args, global_step, claim)
                saved_step = global_step
            if global_step >= total_step:
                break
    bar.close()


def main():
    args = ConfigParser(CONFIG, help_text=__doc__, help_keys=HELP).parse_main()
    on_gpu, conf, run, resume = check_run(args)
    load_data(args.train_path, (args.instruct_column, args.query_column, args.response_column))  # fail fast

    from model_hub.loader import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(args.model_dir)
    train_data = load_training_rows(args, tokenizer)
    claim = claim_output_folder(args, resume, resolve_model_path(args.model_dir))

    model, tokenizer = load_for_lora(args, run, dtype="fp16" if on_gpu else "fp32")
    model = add_method(run, model, lambda base: apply_lora(base, r=args.lora_r, **get_family("llama").lora()))

    import deepspeed

    from tuning.training import print_data_notes, stop_at_end

    distributed.init_process_group()
    loader, sampler = data_loader(args, tokenizer, model, train_data)
    engine, _, _, _ = deepspeed.initialize(config=conf, model=model,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    total_step = len(loader) // args.gradient_accumulation_steps * args.num_train_epochs
    if args.max_steps > 0:
        total_step = min(total_step, args.max_steps)
    if resume:  # (the end of the epochs is known only now)
        stop_at_end(os.path.join(*resume), resumed_step(resume), total_step, "--max_steps=N or --num_train_epochs")
    global_step = load_checkpoint(engine, *resume) if resume else 0
    if resume:
        distributed.say(f"resumed from {os.path.join(*resume)} at step {global_step}")
    train(engine, loader, sampler, args, conf, total_step, global_step, claim)
    distributed.say(f"adapter: {args.save_dir}")
    print_data_notes()


if __name__ == "__main__":
    run_main(main)

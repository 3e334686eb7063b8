"""What tests/test_distributed.py launches under torchrun / deepspeed (each rank runs this file).

    distributed_runner.py [--no-lora-dropout] script SCRIPT ARGS...     # run a recipe entry point as __main__
    distributed_runner.py [--no-lora-dropout] glm4 DUMP DATA MODEL CONFIG   # glm4 finetune(), then DUMP

--no-lora-dropout: LoRA dropout 0 instead of the recipes' 0.1. Loss comparisons with a single-process run need
it: every rank starts from the same seed, so rank 1 draws the dropout masks rank 0 draws, while one process
draws fresh masks for the second half of the same global batch; equal losses are then not expected.
glm4 mode: after training (the final model already saved), every rank joins in gathering the trainable
parameters (ZeRO-3 shards) and in one forward pass on fixed ids; rank 0 writes both to DUMP, so the test can
compare them with what the recipe wrote.
"""
import faulthandler
import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_IDS = [[151331, 151333, 151336, 198, 100, 2000, 3000, 151337, 198, 400]]


def lora_without_dropout(apply_lora):
    def no_dropout(model, target_modules, r=8, alpha=32, dropout=0.1, modules_to_save=None):
        return apply_lora(model, target_modules, r=r, alpha=alpha, dropout=0.0, modules_to_save=modules_to_save)

    return no_dropout


def without_lora_dropout() -> None:
    import tuning.methods

    tuning.methods.apply_lora = lora_without_dropout(tuning.methods.apply_lora)


def glm4(dump: str, data_dir: str, model_dir: str, config_file: str) -> None:
    import torch

    from glm4_finetune.finetune import finetune
    from tuning import distributed

    trainer = finetune(data_dir, model_dir, config_file)
    model = trainer.model
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with distributed.gathered([p for _, p in trainable]):
        gathered = {n: p.detach().clone() for n, p in trainable}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROBE_IDS)).logits.float()
    if distributed.is_main():
        torch.save({"trainable": gathered, "logits": logits}, dump)
    distributed.barrier()


def main(argv: list[str]) -> None:
    launcher_args = [a for a in argv if a.startswith("--local_rank=")]  # the deepspeed launcher's, passed on
    argv = [a for a in argv if a not in launcher_args]
    if argv and argv[0] == "--no-lora-dropout":
        without_lora_dropout()
        argv = argv[1:]
    mode, rest = argv[0], argv[1:]
    if mode == "script":
        sys.argv = [rest[0], *launcher_args, *rest[1:]]
        runpy.run_path(rest[0], run_name="__main__")
    elif mode == "glm4":
        glm4(*rest)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test sends it to a hung job before killing it
    main(sys.argv[1:])

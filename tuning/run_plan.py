"""One training pipeline behind the three recipes' original command lines: a plan checked once, then named phases.

Each recipe keeps its original argument parser (dataclasses, config keys or a YAML file) and calls, in this order:

    check_combination(...)                   # method × quantization × ZeRO stage × precision: one rule set
    plan = plan_run(...)                     # resume point; a finished run stops here (exit 0)
    claim_output(plan, model_path)           # output folder checked, locked, its checkpoints claimed
    model, tokenizer = load_model_and_tokenizer(...)   # model_hub.loader, with plan.bits
    prepare_base(plan, model, ...)           # a frozen k-bit base for QLoRA, gradient checkpointing, no KV cache
    model = add_method(plan, model, make)    # seeded LoRA / P-tuning v2 init (or nothing: full), trainable count
    trainer = ...(callbacks=training_callbacks(model))
    trainer.train(resume_from_checkpoint=plan.resume)
    record_prompt_format(...)                # model_hub.prompt_format: serving builds the trained-on prompt

Nothing is loaded or written before `claim_output`; every refusal before it is one line (tuning.errors).
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import UserError

METHODS = ("lora", "ptuning", "full")


def dash_option(key: str) -> str:
    return f"--{key}"


@dataclass(frozen=True)
class Spelling:
    """How a recipe's user writes its settings (flags, YAML keys, positional arguments), for its messages."""
    option: Callable[[str], str] = dash_option  # the fp16 / bf16 settings
    resume: str = "--resume_from_checkpoint last"
    resume_field: str = "resume_from_checkpoint"
    max_steps: str = "--max_steps"
    overwrite: str = "--overwrite_output_dir"
    with_deepspeed: str = "launch it with DeepSpeed again"   # how to relaunch to resume a DeepSpeed checkpoint
    without_deepspeed: str = "launch it without DeepSpeed"


def check_combination(*, method: str, bits: int | None = None, zero_stage: int | None = None, fp16: bool = False,
                      bf16: bool = False, use_cpu: bool = False, spelling: Spelling = Spelling(),
                      quantized_by: str = "quantization_bit", zero3_advice: str | None = None) -> None:
    """The rules of what trains together, in one place; the first broken one is a UserError whose `field` names
    the setting (fp16, bf16, quantization_bit, deepspeed). `zero_stage` None: no DeepSpeed. A recipe whose own flag
    asked for the k-bit base names it in `quantized_by`, with `zero3_advice` (how to get a ZeRO-3-free run)."""
    from .methods import quantization_conflict
    from .training import check_precision

    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    check_precision(fp16, bf16, use_cpu, spelling.option)
    if bits and zero_stage == 3 and zero3_advice:
        raise UserError(f"{bits}-bit base weights (bitsandbytes) cannot be partitioned by ZeRO-3; {zero3_advice}",
                        field=quantized_by)
    conflict = quantization_conflict(bits, method, zero_stage or 0)
    if conflict:
        raise UserError(conflict, field="quantization_bit")
    if method == "ptuning" and zero_stage == 3:
        raise UserError("ZeRO-3 with P-tuning v2 (prefix tuning) hangs at the first save; use "
                        "configs/ds_zero_2.json", field="deepspeed")


@dataclass(frozen=True)
class RunPlan:
    """What one training run will do, decided before anything is loaded or written."""
    output_dir: str
    method: str
    bits: int | None
    zero_stage: int | None  # None: no DeepSpeed
    resume: str | None      # the checkpoint to resume from, None: a fresh start
    seed: int
    inputs: tuple[str, ...] = ()  # the data: never inside output_dir
    overwrite: bool = False
    spelling: Spelling = field(default_factory=Spelling)


def plan_run(*, output_dir: str, method: str, bits: int | None, zero_stage: int | None, resume, max_steps: int,
             num_train_epochs: float | None, seed: int, inputs=(), overwrite: bool = False,
             spelling: Spelling = Spelling(), resolve: Callable | None = None) -> RunPlan:
    """The resume point of a Trainer run (`resume`: a path, N, last, … read by `resolve(resume, output_dir)`,
    default tuning.training.resolve_resume): a run already at its end stops here (NothingToDo, exit 0), a checkpoint
    written by the other launcher (DeepSpeed or not) is refused."""
    from .training import check_resume_launcher, resolve_resume, stop_if_finished

    checkpoint = (resolve or resolve_resume)(resume, output_dir)
    stop_if_finished(checkpoint, max_steps, num_train_epochs, spelling.max_steps)
    check_resume_launcher(checkpoint, zero_stage is not None, spelling.with_deepspeed, spelling.without_deepspeed,
                          field=spelling.resume_field)
    return RunPlan(output_dir, method, bits, zero_stage, checkpoint, seed, tuple(inputs), overwrite, spelling)


def claim_output(plan: RunPlan, model_path: str | None):
    """tuning.checkpoints.claim_run_folder for the plan (not inside the model, not over the user's files, locked)."""
    from .checkpoints import claim_run_folder

    return claim_run_folder(plan.output_dir, plan.resume, plan.spelling.resume, model_path, inputs=plan.inputs,
                            overwrite=plan.overwrite, flag=plan.spelling.overwrite)


def prepare_base(plan: RunPlan, model, *, gradient_checkpointing: bool):
    """The loaded base made ready for the method: QLoRA's k-bit weights frozen (tuning.methods), gradient
    checkpointing when asked (re-entrant off: adapters and frozen inputs), no KV cache while training."""
    from .methods import prepare_quantized_base

    if plan.bits:
        prepare_quantized_base(model)
    if gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def add_method(plan: RunPlan, model, make: Callable | None = None):
    """`make(model)` (LoRA / P-tuning v2; None: full fine-tuning) after seeding, so the same seed gives the same
    adapter init; says how many weights train."""
    from transformers import set_seed

    from .distributed import say
    from .methods import trainable_summary

    set_seed(plan.seed)
    if make is not None:
        model = make(model)
    say(trainable_summary(model))
    return model


def training_callbacks(model) -> list:
    """The callbacks every recipe's Trainer gets: stop at the first NaN/Inf gradient, loss.png at the end, the
    data notes (rows dropped or cut) repeated once the progress bar is done."""
    from .training import DataNotesAtEnd, LossPlot, NanGuard

    return [NanGuard(model), LossPlot(), DataNotesAtEnd()]

"""What a command prints is the project's own (issue 33, item 1): library lines a user can do nothing about are
silenced where they start, so a one-line error stays one line and a printed result stays the only line, on CPUs
with and without AVX-512 alike (bitsandbytes warns only where AVX512_BF16 is present, DeepSpeed on every CPU)."""
import subprocess
import sys

from conftest import REPO


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_importing_the_training_stack_prints_nothing():
    result = run("import tuning, peft, bitsandbytes, deepspeed, transformers; "
                 "from bitsandbytes.nn import Linear4bit")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (result.stdout, result.stderr) == ("", "")


def test_a_printed_result_is_the_only_line():
    result = run("from bench.common import PACKAGES; import deepspeed; print(len(PACKAGES))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "8\n" and result.stderr == ""


def test_other_library_messages_still_show():
    """Only the two known lines are dropped: another warning of the same loggers still reaches the user."""
    result = run("import tuning, logging; logging.basicConfig(); "
                 "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes warning')")
    assert "another bitsandbytes warning" in result.stderr


def test_glm4_predict_step_does_not_warn_about_max_length():
    """The GLM-4 recipe's predict step printed "Both `max_new_tokens` and `max_length` seem to have been set" each
    time (transformers' default max_length beside the recipe's max_new_tokens; the latter wins, as asked)."""
    result = run("import tuning, torch; from transformers import GenerationConfig; "
                 "from model_hub.loader import load_model_and_tokenizer; "
                 "m, _ = load_model_and_tokenizer('tiny:glm-4-9b-chat', dtype='fp32'); "
                 "out = m.generate(torch.tensor([[1, 2, 3]]), max_length=20, "
                 "generation_config=GenerationConfig(max_new_tokens=4)); print(out.shape[1])")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "7" and "Both `max_new_tokens`" not in result.stderr


def test_trainer_info_lines_name_the_published_checkpoint_and_not_the_hub():
    """Issue 33.1: at log_level info the Trainer named the internal staging folder and asked to share the model on
    huggingface.co after every (offline) run."""
    import logging

    import tuning  # noqa: F401  (installs the filters)

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers.trainer")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info("Saving model checkpoint to %s", "out/run/.saving-checkpoint-4/checkpoint-4")
        logger.info("\n\nTraining completed. Do not forget to share your model on huggingface.co/models =)\n\n")
        logger.info("Saving model checkpoint to out/run/checkpoint-6")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["Saving model checkpoint to out/run/checkpoint-4", "Saving model checkpoint to out/run/checkpoint-6"]


def test_data_notes_at_the_end_start_on_their_own_line_below_an_open_progress_bar():
    """Issue 33.1: the notes were printed while the Trainer's bar was still open (its callback closes it after ours),
    so in a terminal they ran on at the end of the bar's line ("…3.14it/s]data notes …")."""
    import contextlib
    import io

    from tqdm import tqdm

    from tuning import training

    screen = io.StringIO()  # a terminal: the bar (stderr) and the notes (stdout) on one screen
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        bar = tqdm(total=4, file=screen)
        bar.update(4)
        training.DATA_NOTES.append("train.txt: 4 of 1000 rows have their answer truncated")
        training.print_data_notes()
        bar.close()
    text = screen.getvalue()
    at = text.index("data notes (rows dropped or cut before training):")
    assert text[at - 1] in "\r\n", repr(text[max(0, at - 60):at + 20])
    assert "\n  train.txt: 4 of 1000 rows have their answer truncated\n" in text
    assert not training.DATA_NOTES


def test_the_preference_configs_do_not_warn_about_deprecated_arguments():
    """`make llama-ner-dpo` printed transformers' "`gradient_checkpointing` is deprecated" FutureWarning: the DPO
    script passed the old argument name (activation_checkpointing is today's)."""
    result = run("import warnings, argparse; warnings.simplefilter('always'); "
                 "from preference.methods import trainer_config; "
                 "common = dict(save_dir='/tmp/x', learning_rate=1e-4, train_batch_size=1, gradient_accumulation_steps=1, "
                 "num_train_epochs=1, max_steps=1, save_steps=1, log_steps=1, save_total_limit=1, seed=0, bf16=False, "
                 "beta=0.1, max_length=64, simpo_gamma=0.5, deepspeed=None); "
                 "[trainer_config(argparse.Namespace(**common, loss_type=kind), on_gpu=False) "
                 "for kind in ('sigmoid', 'kto', 'orpo', 'simpo')]")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FutureWarning" not in result.stderr, result.stderr[-2000:]

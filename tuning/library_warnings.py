"""Warnings the libraries print on every run that a user can do nothing about: silenced once, here, each with its
reason. Anything else still shows. Imported by `tuning/__init__.py`, so every entry point gets it."""
import logging
import warnings

# peft 0.21 reads the deprecated `is_gradient_checkpointing` alias of transformers 5.23 on every PeftModel it
# builds (training, inference, merging); the warning names no code of ours and nothing the user set.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of `starts`; the rest still shows."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


# bitsandbytes 0.50 on a CPU with AVX512_BF16 tries to fetch an optional kernel from the Hub at import (through the
# `kernels` package, absent and offline here) and warns on every command that imports peft, quantized or not; its
# own CPU path is used instead. Set on the logger before bitsandbytes creates it (getLogger returns the same one).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
# DeepSpeed 0.19 warns at import that it "was unable to detect" a GPU on every CPU machine (to stdout, so a
# command's printed result gets a second line). On a machine with a GPU the warning is not emitted anyway.
logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
# transformers 5.23's Seq2SeqTrainer.predict hands generate a config whose max_length is the library default (20)
# beside the recipe's max_new_tokens: "Both `max_new_tokens` and `max_length` seem to have been set" at every
# predict step. max_new_tokens takes precedence, which is what the recipe asked for.
logging.getLogger("transformers.generation.utils").addFilter(_DropMessages("Both `max_new_tokens`"))


class _TrainerLines(logging.Filter):
    """transformers' Trainer (5.23) at log_level info: "Do not forget to share your model on huggingface.co" after
    every run (dropped: the runs are offline by default), and "Saving model checkpoint to" naming the staging folder
    the atomic save writes first (OUT/.saving-checkpoint-N/checkpoint-N, tuning.checkpoints): shown as the folder the
    checkpoint is published to."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Do not forget to share your model" in message:
            return False
        if message.startswith("Saving model checkpoint to ") and "/.saving-" in message:
            path = message[len("Saving model checkpoint to "):]
            record.msg, record.args = "Saving model checkpoint to %s", (_published(path),)
        return True


def _published(path: str) -> str:
    """OUT/.saving-checkpoint-N/checkpoint-N → OUT/checkpoint-N."""
    head, _, tail = path.partition("/.saving-")
    name = tail.partition("/")[2] or tail
    return f"{head}/{name}"


logging.getLogger("transformers.trainer").addFilter(_TrainerLines())

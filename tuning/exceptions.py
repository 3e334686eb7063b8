"""The exceptions every layer raises, alone at the bottom of tuning/ (they import nothing of the project):
UserError (one line, exit 2), TrainingStopped (exit 1), NothingToDo (exit 0); run_main (tuning.errors) turns them
into what the user sees."""


class UserError(Exception):
    """Something the user gave us is wrong (a file, a field, a flag). Printed as one line; exit code 2."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None):
        self.message, self.path, self.line, self.field = message, path, line, field
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line is not None else f"{self.path}: "
        if self.field is not None:
            where += f"{self.field}: "
        return where + self.message


OUT_OF_MEMORY = ("out of memory: lower the batch size (raise gradient accumulation to keep the effective batch), "
                 "lower max_seq_length, keep gradient checkpointing on, or use LoRA / 8-bit loading; resume from "
                 "the last checkpoint")


class TrainingStopped(Exception):
    """Training had to stop (e.g. a non-finite loss); the message says why and what was kept. Exit code 1."""


class NothingToDo(Exception):
    """The command has nothing to do (e.g. resuming a run that already reached max_steps). The message is
    printed (once per job), nothing is changed, exit code 0."""

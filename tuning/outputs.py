"""Output folders never lose what this code did not write.

- A command that replaces a whole folder (a tokenized `datasets` folder, a converted model) replaces only a
  folder that is new, empty, or an earlier output of the same kind, recognised by its own files; anything else
  is refused in one line (an explicit --overwrite / --force lets the user allow a non-empty foreign folder).
- Never the current folder, a folder that holds one of the run's inputs, or a symbolic link (whose target a
  rename would silently turn into a real folder).
- An output file is never one of the run's inputs.
"""
import fnmatch
import os

from .errors import UserError

# kind → (files one of which must be there, names every entry must match) of an earlier output of that kind.
KINDS = {
    "datasets": (("state.json",), ("data-*-of-*.arrow", "cache-*.arrow", "dataset_info.json", "state.json")),
    "model": (("config.json", "params.json"),
              ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json", "consolidated.*.pth", "params.json",
               "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "*.model",
               "vocab*", "merges.txt", "prompt_format.json")),
}
KIND_NAMES = {"datasets": "datasets folder written by this command", "model": "model folder"}


def is_inside(path: str, folder: str) -> bool:
    """`path` is `folder` or somewhere below it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_earlier_output(folder: str, kind: str) -> bool:
    """Every entry of `folder` is a file an output of `kind` consists of, and its anchor file is there."""
    anchors, patterns = KINDS[kind]
    names = os.listdir(folder)
    return (any(a in names for a in anchors)
            and all(any(fnmatch.fnmatch(n, p) for p in patterns) for n in names))


def refuse_link(path: str, field: str | None = None) -> None:
    if os.path.islink(os.path.normpath(path)):
        raise UserError(f"is a symbolic link (to {os.readlink(os.path.normpath(path))}); give the real folder, "
                        "the output would replace the link", path=path, field=field)


def refuse_inputs(path: str, inputs, what: str = "folder") -> None:
    """`path` (an output) must not be, or hold, any of the run's `inputs`."""
    for source in inputs:
        if source and os.path.exists(source) and is_inside(source, path):
            raise UserError(f"this output {what} holds an input of the run ({source}); write the output elsewhere",
                            path=path)


def check_output_folder(path: str, kind: str, *, inputs=(), overwrite: bool = False,
                        flag: str = "--overwrite") -> None:
    """Refuse (one line, nothing written) an output folder whose replacement would delete what this code did
    not write: see the module docstring."""
    refuse_link(path)
    refuse_home(path)  # not even with the flag: --overwrite on ~ would delete .bashrc and the rest
    if is_inside(os.getcwd(), path):
        raise UserError("is the current folder (or holds it); give a new folder for the output", path=path)
    refuse_inputs(path, inputs)
    if not os.path.isdir(path) or not os.listdir(path) or overwrite or is_earlier_output(path, kind):
        return
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    raise UserError(f"is not empty and is not an earlier {KIND_NAMES[kind]} (it holds {shown}); replacing it would "
                    f"delete those files: give a new or empty folder, or pass {flag} to replace it", path=path)


def check_output_file(path: str, inputs) -> None:
    """An output file that is one of the run's inputs would replace it."""
    for source in inputs:
        if source and os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise UserError(f"is also an input of this run ({source}); write the output to another file", path=path)


def check_files_folder(path: str, kind: str, *, inputs=(), overwrite: bool = False,
                       flag: str = "--overwrite") -> None:
    """For a command that writes its files into `path`, keeping other files there but deleting or replacing
    files of its own `kind` (weights, config, tokenizer): refuse when such files are there and the folder is not
    an earlier output of that kind (they are someone else's), or when `path` holds an input."""
    refuse_link(path)
    refuse_home(path)
    refuse_inputs(path, inputs)
    if not os.path.isdir(path) or overwrite or is_earlier_output(path, kind):
        return
    _, patterns = KINDS[kind]
    found = sorted(n for n in os.listdir(path) if any(fnmatch.fnmatch(n, p) for p in patterns))
    if found:
        shown = ", ".join(found[:3]) + (", …" if len(found) > 3 else "")
        raise UserError(f"holds {shown} but is not an earlier {KIND_NAMES[kind]} (other files are there too); "
                        f"writing here would delete or replace them: give a new or empty folder, or pass {flag}",
                        path=path)


def refuse_home(path: str) -> None:
    """The home folder (or a folder that holds it) is never an output, whatever flag is given."""
    home = os.path.expanduser("~")
    if home != "~" and os.path.isdir(home) and is_inside(home, path):
        raise UserError("is your home folder (or holds it); give a new folder for the output", path=path)


def check_training_folder(path: str, *, inputs=(), overwrite: bool = False, flag: str = "--overwrite_output_dir",
                          earlier_run=lambda folder: False) -> None:
    """A training run writes README.md (PEFT's model card), loss.png, adapter/model files, checkpoints and logs into
    `path`. Refused (one line, nothing written) unless `path` is new, empty or an earlier training output
    (`earlier_run(path)`: it holds the run lock or a checkpoint of this code); `flag` lets the user allow a foreign
    folder. Never, not even with `flag`: a symbolic link, the home folder, the current folder, a folder that holds
    one of the run's `inputs` (the data)."""
    refuse_link(path)
    refuse_home(path)
    if is_inside(os.getcwd(), path):
        raise UserError("is the current folder (or holds it); give a new folder for the run's output", path=path)
    refuse_inputs(path, inputs)
    if not os.path.isdir(path) or not os.listdir(path) or overwrite or earlier_run(path):
        return
    names = sorted(os.listdir(path))
    shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
    raise UserError(f"is not empty and is not an earlier training output (it holds {shown}); the run would write "
                    f"README.md, loss.png and its weights over files there: give a new or empty folder, or pass "
                    f"{flag} to write into it", path=path)


def refuse_output_in_model(output_dir: str, model_dir: str | None) -> None:
    """A run's output folder must not be (or be inside) the base model folder: its adapter would be taken for
    part of the base model by later loads, and a second fine-tune would build on it."""
    if model_dir and os.path.isdir(model_dir) and is_inside(output_dir, model_dir):
        raise UserError(f"is inside the base model folder {model_dir}; the run's adapter and checkpoints would mix "
                        "with the model's files: give another output folder", path=output_dir)

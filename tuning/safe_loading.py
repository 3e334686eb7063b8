"""Loading only data, never code: a pickled .bin/.pth/.pt is read with torch.load(weights_only=True), and one that
holds code or arbitrary objects is refused in one line."""
import contextlib
import re

from .exceptions import UserError


def pickle_refusal(exc: Exception, path: str) -> UserError:
    """The one-line error for a .bin/.pth/.pt that torch.load(weights_only=True) refused: it holds code or
    arbitrary objects (or is not a torch file at all), and we never unpickle those."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f" ({found.group(1)})" if found else ""
    return UserError(f"refused to load: a pickled file here holds code or objects{what}, not only tensors; files are "
                     "read with torch.load(weights_only=True) only. Convert it to safetensors where you trust it",
                     path=path)


@contextlib.contextmanager
def refuse_pickled_code(path: str):
    """Around a load that may meet a .bin: an unsafe pickle becomes the one-line `pickle_refusal` error; a
    .safetensors file whose header is not one (crafted or damaged: a list, wrong types, nesting hundreds deep, a
    length past the end) becomes one line too, instead of the library's traceback."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as exc:
        raise pickle_refusal(exc, path) from None
    except Exception as exc:
        if type(exc).__name__ not in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeader"):
            raise
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"not a valid safetensors file ({reason}); the save that wrote it did not finish, or the "
                        "file is damaged or not what it says", path=path) from None

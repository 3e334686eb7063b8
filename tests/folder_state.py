"""What a folder holds, to prove a command changed nothing in it (names, bytes and modification times)."""
import hashlib
import os


def snapshot(folder) -> dict[str, tuple[int, str]]:
    """Relative path → (mtime in ns, sha256) of every file under `folder`."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return found

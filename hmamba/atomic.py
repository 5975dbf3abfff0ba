"""Atomic writers: every file or folder hmamba writes appears whole or not at all.

Write into a temporary path beside the target (or, for a folder that is kept, inside it) and rename into place
once complete (a rename within one filesystem is atomic), so an error, Ctrl-C or kill mid-write leaves the
previous output intact and no partial file behind. `atomic_dir` itself lives in modeling_hmamba.py because
save_pretrained of the trust_remote_code file needs it there; this module is the one import for the rest of the
package (convert, export, training checkpoints, eval results).
"""

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

from .modeling_hmamba import atomic_dir

__all__ = ["atomic_dir", "atomic_output_dir", "atomic_write", "atomic_write_json"]


@contextmanager
def atomic_output_dir(out, overwrite=False):
    """Yield a temporary folder (a Path) that becomes OUT when the block completes. A non-empty OUT is refused
    unless overwrite; then the previous OUT survives until the new one is whole, and is replaced entirely."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty: choose another folder or pass --overwrite")
        real, cwd = os.path.realpath(out), os.path.realpath(os.getcwd())
        if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
            raise FileExistsError(f"{out} holds the current folder: replacing it would leave this shell in a deleted "
                                  "folder. Run from outside it, or write to another folder")
    with atomic_dir(out, replace=True) as tmp:
        yield Path(tmp)


@contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """`with atomic_write("results.json") as f: json.dump(r, f)`: f is a temporary file beside PATH, flushed,
    fsync'ed and renamed onto PATH when the block completes; on an error PATH keeps its previous content. A symlink
    PATH is followed: its target is written, the link stays."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # less the umask, as any file (mkstemp's: 0600)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, data):
    """JSON (indented, UTF-8, a final newline) written through atomic_write; numpy/torch scalars become numbers,
    sets lists, anything else JSON cannot hold its str()."""
    with atomic_write(path, encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_jsonable, ensure_ascii=False)
        f.write("\n")


def _jsonable(obj):
    if getattr(obj, "ndim", None) == 0 and hasattr(obj, "item"):  # numpy / torch scalar
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)

"""Replacing a file or a folder whole: written beside itself, then renamed into place.

A reader (a server, `users`, the next run) sees the old file or the new, never half of one, and a
write that fails (a full disk, Ctrl-C) leaves the old one as it was and nothing temporary behind.
Every file the project rewrites and every folder it builds (a tiny base, the data cache, a merged
model, a converted base) goes through here; checkpoints keep their own protocol
(``run_dir/checkpoints.py``: a manifest written last, hashed).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flora_train.errors import UserError

# errno values that mean the disk, not the input: one error line naming the file, never a traceback
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


@contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yields the temporary path to write ``path``'s new content to; it is renamed onto ``path`` when
    the block ends without an error, and removed when it does not. An ``OSError`` that names no file
    (a ``write`` on a full disk) is raised again naming ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def replaced_folder(path: Path, tag: str = "tmp") -> Iterator[Path]:
    """Yields a temporary folder beside ``path`` to build its new content in; it replaces ``path``
    when the block ends without an error, and is removed when it does not. An I/O error inside
    (safetensors' as the ``OSError`` it carries) is raised naming ``path``, the folder the user
    knows, not the temporary one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{tag}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with safetensors_errors(staging):
            yield staging
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except OSError as exc:
        inside = exc.filename is None or str(exc.filename).startswith(str(staging))
        if inside and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An ``OSError`` raised inside that names no file (a ``write`` or ``close`` on a full disk) is
    raised again naming ``path``, for the one line the CLI prints."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def replace_text(path: Path, text: str, errors: str = "strict") -> None:
    """``path.write_text(text)`` (UTF-8), whole or not at all; not written when ``path`` holds
    ``text`` already (a resume's recipe.yaml: a full disk then stops nothing that changes nothing)."""
    if _holds(path, [text], errors):
        return
    with replaced(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)


def save_tensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, whose I/O failures (a full disk) arrive as ``SafetensorError``
    with the OS error in its text: raised as that ``OSError``, naming ``path``, so that the callers'
    handling of a full disk (a checkpoint's, an export's, the CLI's one line) covers it too."""
    from safetensors.torch import save_file

    with safetensors_errors(path):
        save_file(tensors, str(path), metadata=metadata)


def save_model_weights(model: Any, path: Path, metadata: dict[str, str] | None = None) -> None:
    """The model's weights in one safetensors file, a tied weight once (under the name that sorts
    first, as ``safetensors.torch.save_model`` keeps it), I/O failures as ``save_tensors``'s.

    The bytes are a function of the weights and ``metadata``: ``save_model`` also notes each dropped
    name in the header's metadata, a map safetensors writes in a random order, so a GPT-2 tiny base
    built twice differed in its header, and in the fingerprint a checkpoint keeps of its base."""
    from safetensors.torch import save_file

    state = model.state_dict()
    tensors: dict[str, Any] = {}
    seen: set[tuple[int, tuple[int, ...], Any]] = set()
    for name in sorted(state):
        tensor = state[name]
        same = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)  # one parameter under two names
        if same not in seen:
            seen.add(same)
            tensors[name] = tensor.contiguous()
    with safetensors_errors(path):
        save_file(tensors, str(path), metadata=metadata)


@contextmanager
def safetensors_errors(path: Path) -> Iterator[None]:
    """safetensors' I/O failures inside (``save_pretrained`` too) raised as the ``OSError`` they carry."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


class UnreadableTensors(UserError, ValueError):
    """A safetensors file this project wrote that does not read back (cut short, overwritten)."""


@contextmanager
def open_tensors(path: Path) -> Iterator[Any]:
    """``safetensors.safe_open``; a file that is not safetensors is ``UnreadableTensors`` naming
    it, an I/O failure the ``OSError`` it carries."""
    from safetensors import SafetensorError, safe_open

    try:
        with safetensors_errors(path), safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise UnreadableTensors(f"{path}: not a readable safetensors file ({exc})") from None


def load_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a safetensors file (``load_file``), its failures as ``open_tensors``'."""
    with open_tensors(path) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def read_json(path: Path) -> Any:
    """A JSON file's value; None when it is missing, cannot be read or does not parse (the caller
    says what it does without it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_lines(path: Path, lines: Callable[[], Iterable[str]]) -> bool:
    """Replaces ``path`` with the lines ``lines()`` yields (each ending in a newline) unless it holds
    exactly those already: a file each command derives again (the synthetic data of a recipe) costs
    no write, and a full disk does not stop a command that changes nothing there. Returns whether
    it wrote."""
    if _holds(path, lines()):
        return False
    with replaced(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.writelines(lines())
    return True


def _holds(path: Path, pieces: Iterable[str], errors: str = "strict") -> bool:
    """Whether ``path`` holds exactly the concatenation of ``pieces`` (read piece by piece)."""
    try:
        with path.open("r", encoding="utf-8", errors=errors, newline="") as f:
            return all(f.read(len(want)) == want for want in pieces) and f.read(1) == ""
    except (OSError, UnicodeDecodeError):
        return False

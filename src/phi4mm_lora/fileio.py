"""File-system facts turned into one clear line: text encodings, safetensors integrity, disk space.

Every reader of a user file that can be damaged (a config, a score table, a manifest, a
weights file) goes through these helpers so the failure names the file and what to do, and
exits 2 instead of showing a ``UnicodeDecodeError`` or ``SafetensorError`` traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

from phi4mm_lora.errors import UserError

#: errno values that mean "this machine cannot store it", not "the program is wrong".
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file; a file in another encoding is a :class:`UserError` naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {p} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                        "re-save it as UTF-8") from None


def safetensors_header(path: str | Path, what: str = "weights file") -> dict:
    """Read and check a ``.safetensors`` header against the file size, without loading tensors.

    Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length
    ``N``, ``N`` bytes of JSON mapping names to ``{dtype, shape, data_offsets}`` (offsets into
    the byte buffer that follows). A file cut off while being copied or written is shorter than
    the largest end offset says; that is the check.
    """
    p = Path(path)
    size = p.stat().st_size
    problem = None
    header: dict = {}
    n = 0
    try:
        with p.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                problem = f"only {size} bytes"
            else:
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    problem = f"header says {n} bytes but the file has {size}"
                else:
                    header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        problem = f"unreadable header ({exc})"
    if problem is None:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        need = 8 + n + max(ends, default=0)
        if size < need:
            problem = f"truncated: {size} bytes, the header needs {need}"
    if problem is not None:
        raise UserError(f"{what} {p} is damaged ({problem}); copy or download it again")
    header.pop("__metadata__", None)
    return header


def check_weight_files(folder: str | Path) -> None:
    """A model folder holds ``*.safetensors`` weights and none is truncated (headers only)."""
    p = Path(folder)
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        raise UserError(f"model folder {p} holds no weights (*.safetensors); copy the checkpoint's weight files there")
    for f in weights:
        safetensors_header(f, "model weights")


def marker_problem(folder: Path, marker: str, legacy_required: tuple[str, ...] = ()) -> str | None:
    """Why ``folder`` is not complete by its ``marker`` file, or None when it is.

    The marker is JSON ``{"files": {relative path: size}}``: complete means every listed file
    is there with that size. A marker without a list (written by earlier versions) counts when
    the ``legacy_required`` files are present and not empty.
    """
    m = folder / marker
    if not m.is_file():
        return f"no {marker} marker: it was cut off while being written"
    try:
        listed = json.loads(m.read_text(encoding="utf-8"))["files"]
        listed = {str(k): int(v) for k, v in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        listed = None
    if listed is None:  # an older marker ("ok")
        gone = [f for f in legacy_required if not (folder / f).is_file() or (folder / f).stat().st_size == 0]
        return f"{', '.join(gone)} missing (a delete or copy was cut off)" if gone else None
    for name, size in listed.items():
        f = folder / name
        if not f.is_file():
            return f"{name} missing (a delete or copy was cut off)"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the marker says {size} (damaged or truncated)"
    return None


def nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_dir(path: str | Path, what: str = "output folder") -> None:
    """``path`` is (or can become) a folder this process can write into; checked by trying."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a folder; choose another path")
    base = nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"{what} {p} cannot be created: {base} is a file")
    probe = base / f".write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{what} {p} is not writable ({base}: {exc.strerror}); choose another path "
                        "or fix its permissions") from None


def free_mb(path: str | Path) -> float:
    return shutil.disk_usage(nearest_existing(Path(path))).free / 2**20


def tree_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC in its many disguises: ``OSError 28``, safetensors' and torch.save's own errors."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc).lower()
    return any(w in text for w in ("no space left", "unexpected pos", "disk quota", "iostream error"))


def os_error_message(exc: OSError) -> str | None:
    """One line for an environment error (disk full, read-only, permission); None for others."""
    where = exc.filename or "a file"
    if exc.errno in DISK_FULL:
        return f"disk full while writing {where} ({exc.strerror}); free some space ({free_mb(where):.0f} MB free) and rerun"
    if exc.errno in NOT_WRITABLE:
        return f"cannot write {where} ({exc.strerror}); choose a writable folder"
    return None


__all__ = ["check_weight_files", "check_writable_dir", "free_mb", "is_disk_full", "marker_problem", "os_error_message", "read_text",
           "safetensors_header", "tree_mb"]

"""Where iclca writes, and how: no output may equal, contain or lie inside an input; an existing output is replaced
only if iclca wrote it (a patch with iclca metadata, a folder with iclca.json) and the user said --force; files and
folders are written beside their target and renamed into place, with the permissions the umask gives."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from .errors import IclcaError, IclcaWarning

PROVENANCE_FILE = "iclca.json"  # in every folder iclca writes (merged checkpoints, adapters)


def check_apart(out: Path, inputs: list[tuple[str, str | Path | None]], flag: str = "--out",
                writes_into: bool = False) -> None:
    """Refuse an output path that equals, contains or lies inside one of `inputs` ((what, path) pairs; a None path:
    nothing local), symlinks followed. `writes_into`: `out` is a folder files are added to, never replaced, so
    containing an input is allowed."""
    o = Path(out).resolve()
    for what, path in inputs:
        if path is None:
            continue
        i = Path(path).resolve()
        relation = ("is" if o == i else "lies inside" if o.is_relative_to(i) else
                    "contains" if i.is_relative_to(o) and not writes_into else None)
        if relation:
            raise IclcaError(f"{flag} {out} {relation} the {what} {path}",
                             "choose an output apart from the inputs: iclca never writes over what it reads")


def is_iclca_patch(path: Path) -> bool:
    from .patch import read_header

    header = read_header(path)
    return header is not None and "iclca.format_version" in header[0]


def is_iclca_folder(path: Path) -> bool:
    return (path / PROVENANCE_FILE).is_file()


def check_patch_target(path: Path, flag: str = "--out") -> bool:
    """Whether a patch may be written at `path`: True if an iclca patch is there already (the caller decides,
    with --force, whether to replace it), False if nothing is; an IclcaError for anything else."""
    if path.is_dir():
        raise IclcaError(f"{flag} {path} is a folder", "--out names the patch file to write; --out-dir a folder")
    if not path.exists():
        if not path.parent.is_dir():
            raise IclcaError(f"output folder does not exist: {path.parent}", f"create it first, or choose another {flag}")
        return False
    if not is_iclca_patch(path):
        raise IclcaError(f"{path} exists and is not an iclca patch",
                         f"choose another {flag}: iclca replaces only patches it wrote")
    return True


def check_folder_target(out: Path, force: bool) -> None:
    """Refuse to write a folder at `out` unless nothing is there, or an iclca folder is and `force` is set; first
    repair what a run killed between its two renames left (move_into_place)."""
    if not out.parent.is_dir():
        raise IclcaError(f"parent folder of {out} does not exist", "create it first, or choose another --out")
    _recover(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise IclcaError(f"output path {out} is a file, not a folder", "choose another --out")
    if not is_iclca_folder(out):
        raise IclcaError(f"output folder {out} exists and was not written by iclca (it has no {PROVENANCE_FILE})",
                         "choose another --out: --force replaces only a folder iclca wrote")
    if not force:
        raise IclcaError(f"output folder {out} already exists", "choose another --out, or pass --force to replace it")


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a temporary file beside it, then a rename), with the umask's permissions;
    on failure nothing is left but what was at `path` before."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise IclcaError(f"cannot write into {path.parent}: {e.strerror}", "choose an output in a writable folder") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise IclcaError(f"cannot write {path}: {e.strerror or e}", "free some space, or choose another output") from e
        raise


def write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp) in a temporary folder beside `out` (iclca.json goes in last), then move it into place; on any
    failure the temporary folder is removed and `out` is as it was."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~umask())
    except OSError as e:
        raise IclcaError(f"cannot write into {out.parent}: {e.strerror}", "choose an --out in a writable folder") from e
    try:
        write(tmp)
        move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise IclcaError(f"cannot write {out}: {e.strerror or e}", "free some space, or choose another --out") from e
        raise


def _aside(out: Path) -> str:
    return f".{out.name}.old-"


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` is moved aside (.<name>.old-...) and removed only after the
    new one is in place. A run killed in between leaves the old folder aside, which the next run puts back."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(_aside(out) + tmp.name)
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _recover(out: Path) -> None:
    """After a run killed between move_into_place's renames: put the old folder back if nothing is at `out`, or finish
    removing it if the new one is in place."""
    aside = sorted((p for p in out.parent.glob(_aside(out) + "*") if is_iclca_folder(p)), key=lambda p: p.stat().st_mtime_ns)
    if not aside:
        return
    if not out.exists():
        aside[-1].rename(out)
        warnings.warn(f"{out} was moved aside by a run that was interrupted; it is back in place", IclcaWarning, stacklevel=2)
        aside = aside[:-1]
    for p in aside:
        shutil.rmtree(p, ignore_errors=True)

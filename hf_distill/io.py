"""Crash-safe saving: write a folder beside its target, then rename it into place.

A run killed while saving must leave the previous save (or checkpoint) whole. :func:`atomic_directory`
yields a fresh temporary folder in the target's parent (same file system, so the rename is atomic); on
success its files are flushed to disk and it replaces the target, on failure it is removed and the
target is left as it was. :func:`last_complete_checkpoint` finds the newest ``checkpoint-<step>`` folder
that was written to the end, for resuming after a crash.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on some platforms (Windows): skip
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy with threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def readable_as_umask_allows(folder: PathLike) -> None:
    """Give every file below ``folder`` the mode a plain ``open()`` would (0666 & ~umask): safetensors writes its
    files 0600, so weights saved for others (a service account, a shared folder) could not be read."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)


@contextmanager
def atomic_directory(final_path: PathLike, *, overwrite: bool = True, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_path``; on success rename it to ``final_path``.

    * On an exception (including KeyboardInterrupt) the temporary folder is removed and an existing
      ``final_path`` is untouched.
    * On success with an existing ``final_path``: it is renamed aside, the new folder renamed into place,
      then the old one removed (``overwrite=False`` raises FileExistsError instead, before any change).
      Between the two renames (microseconds) ``final_path`` does not exist; a crash exactly there leaves
      the previous version as ``.<name>.old-<id>`` beside it.
    * ``fsync``: flush the files before the rename, so a power loss cannot leave a renamed folder of
      empty files.

    The temporary name starts with a dot (``.<name>.tmp-<random>``), so ``checkpoint-*`` scans ignore it.
    Single-process: in multi-process saves, let every rank write into one agreed folder and rename on the
    main process after a barrier.
    """
    final = Path(final_path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; pass overwrite=True to replace it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the usual permissions
    try:
        yield staging
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} appeared while saving; pass overwrite=True to replace it.")
        replace_directory(staging, final, fsync=fsync)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(staging: PathLike, final: PathLike, *, fsync: bool = True) -> None:
    """Move the finished folder ``staging`` to ``final`` (same file system), replacing any folder there.

    An existing ``final`` is renamed aside first and removed after the swap, so at every instant either the
    old or the new folder is whole. Used by :func:`atomic_directory` and by multi-process checkpoint saves,
    where every rank writes into one agreed staging folder and the main process renames it after a barrier.
    """
    staging, final = Path(staging), Path(final)
    readable_as_umask_allows(staging)
    if fsync:
        _fsync_tree(staging)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    if fsync:
        _fsync_dir(final.parent)


@contextmanager
def atomic_contents(folder: PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary folder inside ``folder``; on success move each of its entries into ``folder``.

    For saves into a folder that holds other things (the final student goes to ``output_dir``, beside the
    ``checkpoint-*`` folders), so the folder itself cannot be swapped. Every file is written and flushed
    before any is moved; each entry then replaces its namesake with one rename (sub-folders through
    :func:`replace_directory`). A crash while writing leaves the previous save untouched; only a crash in
    the final renames (microseconds) can mix old and new files. On an exception the temporary folder goes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".save.tmp-", dir=folder))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        readable_as_umask_allows(staging)
        if fsync:
            _fsync_tree(staging)
        for entry in sorted(staging.iterdir()):
            target = folder / entry.name
            if entry.is_dir():
                replace_directory(entry, target, fsync=False)
            else:
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
        if fsync:
            _fsync_dir(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def last_complete_checkpoint(output_dir: PathLike, required: tuple[str, ...] = ("trainer_state.json",)) -> Optional[str]:
    """The ``checkpoint-<step>`` folder in ``output_dir`` with the highest step that holds every file in
    ``required`` (the Trainer writes ``trainer_state.json`` last), or None.

    Unlike ``transformers.trainer_utils.get_last_checkpoint`` this skips a folder that a crash left half
    written, so ``train(resume_from_checkpoint=last_complete_checkpoint(out))`` resumes from the last good one.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    candidates = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and all((child / name).is_file() for name in required):
            candidates.append((int(match.group(1)), child))
    return str(max(candidates)[1]) if candidates else None


__all__ = ["atomic_contents", "atomic_directory", "last_complete_checkpoint", "replace_directory"]

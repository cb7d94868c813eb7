"""Replacing a folder atomically: the one implementation behind `checkpoint.save` and `hf.save_hf`.

A save writes everything into a temporary sibling of the target, then swaps it in:

    .run.tmp-<pid>-<hex>     the new folder, written and fsynced while `run` is untouched
    run -> .run.old-<pid>-<hex>   rename 1: the old folder aside
    .run.tmp-... -> run      rename 2: the new one in
    .run.old-...             deleted

A crash (kill -9, power loss) at any moment leaves either the old folder or the new one in place, or,
between the two renames, no `run` and the old folder as `.run.old-<pid>-...`: `recover(run)`, which
every save and every loader calls first, puts it back. Siblings of a process that no longer runs (or
of this process: its saves do not overlap) are left-overs; `recover` deletes them, so an interrupted
save does not leave a hidden copy of the weights behind for ever. A live process's siblings are
never touched.

Entries of the old folder that the new one does not own (the user's notes.txt, a samples/ folder, a
tokenizer next to transformers' files) are carried into the new folder before the swap, as hard
links (no copy of the data, and a file another process is appending to stays the same file), or as
copies where the file system has no hard links; symbolic links stay links. The new folder gets the
old folder's permissions (a new one: 0777 less the umask, as mkdir gives).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

_KIND = re.compile(r"(tmp|old)-(\d+)(?:-[0-9a-f]+)?")  # after ".<target name>."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process: callers recover only when none of its saves is under way
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


def siblings(target: Path) -> list[tuple[Path, str, int]]:
    """(path, 'tmp' or 'old', pid) of the temporary siblings of `target` that saves leave."""
    target = Path(target)
    prefix = f".{target.name}."
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.name.startswith(prefix):
            m = _KIND.fullmatch(entry.name[len(prefix) :])
            if m is not None:
                out.append((entry, m.group(1), int(m.group(2))))
    return sorted(out)


def _sibling_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def recover(target: str | Path) -> None:
    """Put back the folder a save interrupted between its two renames, and delete the temporary
    siblings that dead (or finished) saves left. A no-op when there is nothing to do."""
    target = Path(target)
    stale = [(p, kind) for p, kind, pid in siblings(target) if not _alive(pid)]
    if not target.exists() and not target.is_symlink():
        backups = [p for p, kind in stale if kind == "old" and p.is_dir()]
        if backups:
            newest = max(backups, key=lambda p: p.stat().st_mtime)
            os.replace(newest, target)
            stale = [(p, kind) for p, kind in stale if p != newest]
    for p, _ in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


def temp_folder(target: str | Path) -> Path:
    """A new empty temporary sibling of `target` to write a save into (mode 0777 less the umask)."""
    target = Path(target)
    tmp = _sibling_name(target, "tmp")
    os.mkdir(tmp, 0o777)
    return tmp


def probe(target: str | Path) -> None:
    """Raise OSError unless a save to `target` could create its temporary sibling; leaves no trace."""
    tmp = temp_folder(target)
    os.rmdir(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(entry: Path, dst: Path) -> None:
    """Put `entry` (a file, link or folder of the old folder) at `dst` in the new one, sharing the data."""
    if entry.is_symlink():
        os.symlink(os.readlink(entry), dst)
    elif entry.is_dir():
        shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(entry), str(dst))


def replace_folder(new: str | Path, target: str | Path, keep: Callable[[str], bool]) -> None:
    """Put the folder `new` (a `temp_folder(target)`) where `target` is, atomically (see above).

    keep(name) says which entries of the old `target` to carry into the new folder (those the new
    folder does not own); an entry the new folder already has is never overwritten."""
    new, target = Path(new), Path(target)
    for f in new.iterdir():  # the new files are on disk before any rename
        if f.is_file() and not f.is_symlink():
            _fsync(f)
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a folder")
        for entry in target.iterdir():
            if keep(entry.name) and not os.path.lexists(new / entry.name):
                _carry(entry, new / entry.name)
        os.chmod(new, stat.S_IMODE(target.stat().st_mode))
        backup = _sibling_name(target, "old")
        os.replace(target, backup)  # rename 1: the old folder aside
        try:
            os.replace(new, target)  # rename 2: the new one in
        except OSError:
            os.replace(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(new, target)
    _fsync(target.parent)

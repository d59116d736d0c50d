"""Crash-safe writes: a file or folder is built beside its target and renamed into place.

Folders (``staged_dir``, used for every checkpoint):

1. a staging folder ``NAME.tmp-XXXXXXXX`` is made beside the target, holding a marker file ``.hmt-save.json``
   that its writer keeps locked (``flock``) while it works;
2. the caller writes the new checkpoint into it; its files are flushed to disk (fsync);
3. the marker is completed: it lists the files and names the folder the old target will be moved to;
4. an existing target is renamed to ``NAME.old-XXXXXXXX``, the staging folder is renamed to ``NAME``, and the old
   folder is removed.

A crash at any point leaves either the old or the new checkpoint: at the target, or (between the two renames of
step 4) in a complete staging folder that ``recover`` renames into place; every reader of a checkpoint calls
``recover`` first.  Leftovers of interrupted saves (folders with the name pattern and the marker whose lock is
free) are removed by the next save or load of the same target.  A save never deletes what it did not write: a
target folder that holds other files than a checkpoint's (``owned`` names, or the names its marker lists) is
refused, and so is a target that is a file.

Files (``staged_file``): written to ``NAME.tmp-XXXXXXXX.partial`` beside the target (locked while written) and
renamed over it; stale partial files of the same target are removed by its next save (``clean_partials`` removes
those of a whole folder).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

MARKER = ".hmt-save.json"
MARKER_FORMAT = "hmt-staged-save"
_SUFFIX = r"[a-z0-9_]{8}"  # tempfile's random names
_PARTIAL = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(folder: Path) -> None:
    """mkdtemp, mkstemp and some writers (safetensors) make owner-only files; give the tree the usual modes, and
    flush every file to disk so that the rename that publishes the folder never publishes unwritten data."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~mask)
            _fsync_path(path)
        _fsync_path(root)


def _fsync_path(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync folders
        pass
    finally:
        os.close(fd)


def path_text(value, what: str = "path", expected: str = "a folder path") -> str:
    """A path argument as text: clear errors (naming ``what``) for None, other types and an empty string."""
    if value is None or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what}={value!r}: expected {expected} (str or os.PathLike)")
    raw = os.fspath(value)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if not raw.strip():
        raise ValueError(f"{what}={raw!r}: expected {expected}, got an empty string")
    return raw


def checked_target(target, what: str = "path") -> Path:
    """The absolute target of a folder write; refuses an empty path, the current folder or one above it, the
    root, a regular file and a path under a regular file (``what`` names the argument in the error)."""
    raw = path_text(target, what)
    path = Path(os.path.realpath(raw))
    cwd = Path(os.path.realpath(os.getcwd()))
    if path == cwd or path in cwd.parents or path.parent == path:
        raise ValueError(
            f"{what}={raw!r}: expected a new or checkpoint folder other than the current folder, one above it or "
            "the root (the folder is written beside its target and renamed into place)"
        )
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{what}={raw!r} is a file; expected a folder (an existing file is never replaced)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{what}={raw!r}: {str(parent)!r} is a file, not a folder")
            break
    return path


# ------------------------------------------------------------------------------------------------ markers
def _read_marker(folder: Path) -> dict | None:
    """The marker of ``folder`` as a dict; {} when present but unreadable (a save died while writing it);
    None when there is none."""
    path = folder / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else {}


class _Lock:
    """A non-blocking exclusive flock on ``path``; ``held`` is False when another writer holds it."""

    def __init__(self, path: Path):
        self.fd = None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            self.held = False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            self.held = False
            return
        self.fd, self.held = fd, True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


class _Marker:
    """The locked marker of a staging folder, written in place through the locked descriptor."""

    def __init__(self, folder: Path, target_name: str):
        self.fd = os.open(folder / MARKER, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.data = {"format": MARKER_FORMAT, "target": target_name, "complete": False,
                     "created_ns": time.time_ns(), "pid": os.getpid()}
        self._write()

    def _write(self) -> None:
        blob = json.dumps(self.data, indent=1).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, blob, 0)
        os.fsync(self.fd)

    def complete(self, files: list[str], old: str | None) -> None:
        self.data.update(complete=True, files=files, old=old)
        self._write()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _leftover_pattern(name: str):
    return re.compile(re.escape(name) + r"\.(tmp|old)-" + _SUFFIX)


def recover(target) -> Path:
    """Finish or undo an interrupted folder swap at ``target`` and remove leftovers of interrupted saves.

    When ``target`` is missing but a complete staging folder of it exists (a save died between its two renames),
    that folder is renamed into place; failing that, the newest old copy is moved back.  Returns the folder to
    read: ``target``, or the recovered folder itself when the renames are not possible (a read-only parent).
    Best effort: a leftover that cannot be removed stays (it is tried again next time).  Folders of a save in
    progress (their marker is locked) are never touched.
    """
    target = Path(os.path.realpath(os.fspath(target)))
    parent = target.parent
    pattern = _leftover_pattern(target.name)
    try:
        names = [e.name for e in os.scandir(parent) if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return target
    if not names:
        return target
    stale_tmp: list[tuple[Path, dict, _Lock]] = []
    protected: set[str] = set()  # old copies named by a save in progress
    journal: set[str] = set()    # old copies named by a finished or dead save
    olds: list[Path] = []
    for name in sorted(names):
        folder = parent / name
        if ".old-" in name[len(target.name):]:
            olds.append(folder)
            continue
        marker = _read_marker(folder)
        if marker is None:
            continue  # not made by a save of this package: never touched
        lock = _Lock(folder / MARKER)
        if not lock.held:
            protected.add(str(marker.get("old")))
            continue
        stale_tmp.append((folder, marker, lock))
        if marker.get("old"):
            journal.add(str(marker["old"]))
    result = target
    try:
        if not os.path.lexists(target):
            complete = [(m.get("created_ns", 0), f) for f, m, _ in stale_tmp
                        if m.get("complete") and m.get("target") == target.name]
            if complete:
                source = max(complete)[1]
            else:
                known = [f for f in olds if f.name not in protected and (f.name in journal or _read_marker(f))]
                source = max(known, key=lambda f: f.stat().st_mtime_ns) if known else None
            if source is not None:
                try:
                    os.replace(source, target)
                except OSError:
                    return source  # cannot rename here (read-only): read the recovered copy where it is
        present = target.is_dir()
        for folder, marker, _ in stale_tmp:
            # a complete copy is kept while it may be the only one (no target to fall back on)
            if folder.exists() and (present or not marker.get("complete")):
                shutil.rmtree(folder, ignore_errors=True)
        if not present:
            return result
        own = _read_marker(target) or {}
        if own.get("old"):
            journal.add(str(own["old"]))
        for folder in olds:
            if folder.name not in protected and (folder.name in journal or _read_marker(folder) is not None):
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        for _, _, lock in stale_tmp:
            lock.release()
    return result


def foreign_entries(target: Path, owned=()) -> list[str]:
    """Entries of the folder ``target`` that a save did not write: neither in ``owned``, nor listed in the
    target's marker, nor the marker itself."""
    if not target.is_dir():
        return []
    marker = _read_marker(target) or {}
    ours = set(owned) | set(marker.get("files") or ()) | {MARKER}
    return sorted(name for name in os.listdir(target) if name not in ours)


@contextlib.contextmanager
def staged_dir(target, owned=(), what: str = "path"):
    """Yield an empty folder beside ``target``; on success it replaces ``target`` (see the module docstring).

    owned: names of the entries a checkpoint folder of this kind holds; an existing target with any other entry
    is refused (FileExistsError naming them) and left untouched.  On an exception the target is left as it was.
    """
    target = checked_target(target, what)
    recover(target)
    owned = tuple(owned)

    def refuse_foreign() -> None:
        foreign = foreign_entries(target, owned)
        if foreign:
            shown = ", ".join(repr(n) for n in foreign[:8]) + (" ..." if len(foreign) > 8 else "")
            raise FileExistsError(
                f"{what}={str(target)!r} holds files that are not part of a checkpoint ({shown}); expected a new "
                "folder, an empty one or a checkpoint folder (nothing is deleted: choose another folder or move them)"
            )

    refuse_foreign()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    marker = None
    moved = None  # the old target, while it is renamed aside
    try:
        marker = _Marker(tmp, target.name)
        yield tmp
        _normal_permissions(tmp)
        refuse_foreign()  # the target may have changed while the checkpoint was written
        files = sorted(n for n in os.listdir(tmp) if n != MARKER)
        old = None
        if os.path.lexists(target):
            old = target.with_name(target.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
        marker.complete(files, old.name if old is not None else None)
        if old is not None:
            os.replace(target, old)
            moved = old
        os.replace(tmp, target)
        moved = None
        _fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if moved is not None and not os.path.lexists(target):
            try:
                os.replace(moved, target)  # undo the first rename
                moved = None
            except OSError:
                pass  # recover() finishes the swap from the complete staging folder
        raise
    finally:
        if marker is not None:
            marker.close()
        if moved is None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _clean_partials(path: str) -> None:
    folder, name = os.path.split(path)
    clean_partials(folder or ".", re.escape(name))


def clean_partials(folder, name_pattern: str = r".+") -> int:
    """Remove the partial files of killed ``staged_file`` writes in ``folder`` whose target name matches
    ``name_pattern`` (a regular expression); partial files of writes in progress (locked) are left alone.
    Returns how many were removed."""
    pattern = re.compile("(?:" + name_pattern + r")\.tmp-[A-Za-z0-9_]{8}" + re.escape(_PARTIAL))
    try:
        names = [e.name for e in os.scandir(folder) if pattern.fullmatch(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return 0
    removed = 0
    for n in names:
        partial = os.path.join(folder, n)
        lock = _Lock(Path(partial))
        try:
            if lock.held:
                os.remove(partial)
                removed += 1
        except OSError:
            pass
        finally:
            lock.release()
    return removed


@contextlib.contextmanager
def staged_file(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (a failed or killed write leaves
    ``path`` as it was; the partial file of a killed one is removed by the next save of ``path``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    _clean_partials(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", suffix=_PARTIAL, dir=folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live write: the next save's cleaning leaves it alone
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes an owner-only file
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(folder)
    finally:
        os.close(fd)
        if os.path.exists(tmp):
            os.remove(tmp)

"""Writing files without losing anyone's data: atomic writes, the overwrite rule, the folder lock, leftovers.

- Atomic: everything is written under a hidden temporary sibling, ``.NAME.tmp-<pid>-<random>``, and renamed
  into place only when complete, so a reader never sees half a file or folder.
- The overwrite rule (``check_output``), the same for every command that writes a folder: it writes into a
  new or empty folder, or one that carries the command's own marker file (``manifest.json`` for export and
  build); anything else needs ``--overwrite``. A path that is a file is never replaced by a folder, and an
  output never is, contains or lies inside one of the command's inputs, whatever the flags say.
- The folder lock (``output_folder``): writers that update a folder in place hold ``.mbexport.lock``
  (``flock``, with the holder's pid and command in it) for the whole update; a second writer waits and
  says who holds it. The kernel drops the lock of a process that dies, so a stale lock file is simply taken
  over.
- Leftovers: a killed writer's temporaries carry its pid; later writers delete those whose pid is gone,
  never a live writer's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from mbexport.errors import MbexportError, first_line

OVERWRITE_FLAG = "--overwrite"
LOCK = ".mbexport.lock"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[^-]+$")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's words for a short write
_held: set[Path] = set()  # folders this process has locked (a nested writer must not wait for itself)


def temp_prefix(final: str | Path) -> str:
    """The prefix of every temporary for ``final``: hidden, and naming this process so leftovers can be told."""
    return f".{Path(final).name}.tmp-{os.getpid()}-"


# ---- the overwrite rule ----------------------------------------------------------------------------------------------
def check_output(path: str | Path, *, overwrite: bool = False, sources=(), marker: str | None = None) -> str:
    """Apply the overwrite rule to the folder ``path`` a command is about to write; returns what it is:
    ``"new"``, ``"empty"`` (or only what a killed mbexport writer left), ``"ours"`` (holds ``marker``) or
    ``"replace"`` (non-empty, ``overwrite`` given).

    ``sources`` are the command's inputs: the output may not be one of them, lie inside one, or hold one.
    """
    path = Path(path)
    where = path.resolve()
    for source in sources:
        if source is None:
            continue
        inside = Path(source).resolve()
        how = "is" if where == inside else "lies inside" if inside in where.parents else "holds" \
            if where in inside.parents else None
        if how:
            raise MbexportError(f"{how} the input {source}; write the output somewhere else", path)
    if not path.exists():
        if path.is_symlink():
            raise MbexportError("is a dangling symbolic link; give a folder", path)
        return "new"
    if not path.is_dir():
        raise MbexportError("is a file, not a folder; give a folder to write into", path)
    entries = sorted(entry.name for entry in path.iterdir() if not _ours_only(entry))
    if not entries:
        return "empty"
    if marker is not None and (path / marker).is_file():
        return "ours"
    if overwrite:
        return "replace"
    what = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}: {', '.join(entries[:3])}" \
           f"{', ...' if len(entries) > 3 else ''}"
    mine = f" and was not written by mbexport (no {marker})" if marker else ""
    raise MbexportError(f"is not empty ({what}){mine}; choose a new or empty folder, or pass {OVERWRITE_FLAG} "
                        "to replace it", path)


def _ours_only(entry: Path) -> bool:
    """The lock, a temporary, or a folder holding nothing else: what a killed writer leaves in a new folder."""
    if entry.name == LOCK or _LEFTOVER.match(entry.name):
        return True
    return entry.is_dir() and not entry.is_symlink() and all(_ours_only(e) for e in entry.iterdir())


def final_path(path: str | Path) -> Path:
    """The path a temporary (``.NAME.tmp-<pid>-*``, or a file inside one) stands for, for messages."""
    path = Path(path)
    for i, part in enumerate(path.parts):
        match = _LEFTOVER.match(part)
        if match:
            return Path(*path.parts[:i], match["name"])
    return path


def write_error(error: OSError, folder: Path) -> MbexportError:
    """What the file system refused while writing ``folder``, as one line naming the file (or the folder,
    when the library that wrote gave no name: numpy's short write says only "16384 requested and 10240
    written", which is how ENOSPC reaches it)."""
    reason = error.strerror or first_line(error)
    if error.errno is None and _SHORT_WRITE.search(reason):  # a write the file system cut short: it is full
        reason = f"no space left on device ({reason})"
    where = final_path(error.filename) if error.filename else folder
    return MbexportError(f"cannot write it: {reason[:1].lower()}{reason[1:]}", where)


# ---- atomic writes ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False, sources=(), marker: str | None = None,
               log: Callable[[str], None] = lambda line: None) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``final`` only if the block succeeds. ``final`` obeys the
    overwrite rule (``check_output``): an existing one is replaced only when empty, ours, or ``overwrite``."""
    final = Path(final)
    check_output(final, overwrite=overwrite, sources=sources, marker=marker)
    created = _make_dirs(final.parent)
    clean_leftovers(final.parent, only=final.name, log=log)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~umask())  # mkdtemp's folder is private; a folder users share follows their umask
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if isinstance(error, OSError):
            raise write_error(error, final) from error
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder that becomes ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(final), dir=final.parent)
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp's file is private; what we write follows the user's umask
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- folders updated in place: the lock ------------------------------------------------------------------------------
@contextlib.contextmanager
def output_folder(path: str | Path, *, overwrite: bool = False, sources=(), marker: str | None = None,
                  keep_on: tuple[type[BaseException], ...] = (), log: Callable[[str], None] = lambda line: None,
                  ) -> Iterator[Path]:
    """The folder an in-place writer (export, build) works in, for the duration of the block: checked by the
    overwrite rule, locked, cleared when it is replaced, swept of dead writers' temporaries. A folder this call
    created is removed again if the block fails (except with ``keep_on`` exceptions, e.g. a failed validation
    whose report the user wants to read)."""
    path = Path(path)
    check_output(path, overwrite=overwrite, sources=sources, marker=marker)
    with folder_lock(path, log=log) as created:
        try:
            if check_output(path, overwrite=overwrite, sources=sources, marker=marker) == "replace":
                for entry in path.iterdir():
                    if entry.name != LOCK:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            clean_leftovers(path, log=log)
            yield path
        except keep_on:
            raise
        except BaseException as error:
            _remove_created(created)  # still under the lock: a waiting writer finds the folder gone and makes it
            if isinstance(error, OSError):
                raise write_error(error, path) from error
            raise


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, log: Callable[[str], None] = lambda line: None) -> Iterator[Path | None]:
    """Hold ``folder/.mbexport.lock`` (creating the folder); waits, saying who holds it, while another process
    does. Yields the topmost folder this call created, or None."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        yield None
        return
    while True:
        created = _make_dirs(folder)
        lock = folder / LOCK
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the previous holder removed the folder it had created: make it again
            continue
        except OSError as error:  # read-only, not ours, full
            raise MbexportError(f"cannot write in this folder ({error.strerror})", folder) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"{folder}: waiting for {_holder(lock)}, which is writing this folder")
                fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(lock, fd):  # the holder unlinked it on release: lock the one now at that path
                os.close(fd)
                continue
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        previous = _read_holder(fd)
        if previous and not _alive(previous.get("pid")):
            log(f"{folder}: took over the lock left by {_describe(previous)} (no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    except OSError as error:  # a full disk
        os.unlink(lock)
        os.close(fd)
        _remove_created(created)
        raise write_error(error, folder) from error
    _held.add(key)
    try:
        yield created
    finally:
        _held.discard(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
        return data if isinstance(data, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _holder(lock: Path) -> str:
    try:
        with open(lock, "rb") as f:
            return _describe(_read_holder(f.fileno()))
    except OSError:
        return "another process"


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} ({holder.get('command', '?')}, since {holder.get('since', '?')})"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---- leftovers -------------------------------------------------------------------------------------------------------
def clean_leftovers(folder: str | Path, *, only: str | None = None, depth: int = 3,
                    log: Callable[[str], None] = lambda line: None) -> list[Path]:
    """Delete the temporaries that writers which are no longer running left in ``folder`` (and below it, to
    ``depth`` levels); ``only`` restricts it to those of one final name. A folder a killed ``atomic_dir`` had
    moved aside (``.NAME.old-*``) goes back into place when nothing replaced it. Returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match and (only is None or match["name"] == only) and not _alive(int(match["pid"])):
            final = folder / match["name"]
            if match["what"] == "old" and (entry / match["name"]).exists() and not final.exists():
                os.replace(entry / match["name"], final)
                log(f"restored {final}, which an interrupted write had moved aside")
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
            log(f"removed {entry}, left by pid {match['pid']} (no longer running)")
        elif only is None and depth > 1 and entry.is_dir() and not entry.is_symlink():
            removed += clean_leftovers(entry, depth=depth - 1, log=log)
    return removed


def _make_dirs(folder: Path) -> Path | None:
    """``mkdir -p folder``; returns the topmost folder it created (None when it existed)."""
    missing = [folder, *folder.parents]
    top = None
    for parent in missing:
        if parent.exists():
            break
        top = parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MbexportError("is a file, not a folder", next(p for p in missing if p.exists())) from None
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            raise MbexportError("a part of this path is a file, not a folder", folder) from None
        raise
    return top


def _remove_created(top: Path | None) -> None:
    if top is not None:
        shutil.rmtree(top, ignore_errors=True)

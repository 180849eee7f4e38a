"""What a run owns in its output folder: a lock while it runs, a record of what made it.

A command that writes an output folder (``--out``) claims it with :func:`claim_folder`
right after its flags are checked and before any model loads:

- **the lock** (``OUT/.tyche.lock``, JSON: the PID, the host, the process's start time read
  from ``/proc/<pid>/stat`` where there is one, the command line, when it started) is
  created atomically (``O_CREAT | O_EXCL``), so a second run into the same folder is refused
  at once, naming the run that holds it. A lock whose process is gone (or whose PID now
  belongs to a process that started later) is stale: it is taken over with a one-line note
  on stderr. The lock is released when the claim ends, whether the run finished or failed,
  and at interpreter exit as a safety net. Under ``torchrun`` only rank 0 (env ``RANK``)
  takes it and writes the record.
- **the record** (``OUT/run.json``): the command and its settings (the flags that change its
  results, defaults filled in), ``finished`` false while it runs and true once it is done. A
  new run into a folder holding a run of other settings is refused, naming the differences,
  unless ``overwrite``; the same settings may run again (they recompute the same result). A
  folder holding results but no record (an older version wrote them) is refused unless
  ``overwrite``: nothing can tell what settings made them. With ``overwrite`` the old run's
  files (only those the command writes, :class:`Owned`) are removed first, so the folder
  never mixes runs. ``resume`` skips the comparison: a resumed run has its own checks.

Standard library only (no torch), so these checks stay as fast as the flag checks.
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import json
import os
import shlex
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tyche.cli.commandline import CommandError

__all__ = [
    "LOCK_FILE",
    "RECORD_FILE",
    "Claim",
    "FolderLock",
    "Owned",
    "check_new_file",
    "check_unlocked",
    "claim_folder",
    "differences",
    "read_record",
    "resume_refusal",
]

LOCK_FILE = ".tyche.lock"
RECORD_FILE = "run.json"
#: an unreadable lock younger than this (seconds) is being written by the run taking it
_FRESH_LOCK_SECONDS = 10.0


def _rank() -> int:
    """torchrun's ``RANK`` (0 when unset or unreadable)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _command_line() -> str:
    """This process's command line, its program shown as the user typed it."""
    argv = list(sys.argv) or ["python"]
    first = Path(argv[0])
    argv[0] = f"python -m {first.parent.name}" if first.name == "__main__.py" else first.name
    return " ".join([argv[0], shlex.join(argv[1:])]).strip()


# ----------------------------------------------------------------------------- the lock
def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``
    field 22), or None where there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's contents; None if it cannot be read or parsed (or is gone)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _holder_state(path: Path, info: dict[str, Any] | None) -> str:
    """``"live"``, ``"stale"`` or ``"elsewhere"`` (another host: cannot be checked)."""
    if info is None:  # being written right now, or left half-written long ago
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return "stale"
        return "live" if age < _FRESH_LOCK_SECONDS else "stale"
    if info.get("hostname") != socket.gethostname():
        return "elsewhere"
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        return "stale"
    saved, now = info.get("process_start"), _process_start(pid)
    if saved is not None and now is not None and saved != now:
        return "stale"  # the PID was reused by a process that started later
    return "live"


def _holder(info: dict[str, Any] | None) -> str:
    if info is None:
        return "another run (its lock is being written)"
    return f"PID {info.get('pid')} ({info.get('command', '?')}), started {info.get('started', '?')}"


def _refusal(folder: Path, flag: str, path: Path, info: dict[str, Any] | None, state: str) -> str:
    where = str(folder)
    if state == "elsewhere":
        host = (info or {}).get("hostname")
        return (
            f"{flag} {where} is in use by a run on host {host}: {_holder(info)}; wait for it "
            f"to finish or choose another {flag} (if that run is gone, delete {path})"
        )
    return (
        f"{flag} {where} is in use by another run: {_holder(info)}; wait for it to finish, "
        f"or choose another {flag}"
    )


def check_unlocked(folder: str | os.PathLike[str], flag: str = "--out") -> None:
    """Raise :class:`CommandError` if a live run holds ``folder``'s lock (takes nothing;
    rank 0 only, the other ranks of a run see their own rank 0's lock)."""
    path = Path(folder).expanduser() / LOCK_FILE
    if _rank() != 0 or not path.exists():
        return
    info = _read_lock(path)
    state = _holder_state(path, info)
    if state != "stale" and not (info and info.get("pid") == os.getpid()):
        raise CommandError(_refusal(Path(folder), flag, path, info, state))


class FolderLock:
    """The lock on one output folder, held by this process (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], *, flag: str = "--out",
                 prog: str = "tyche") -> None:  # fmt: skip
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_FILE
        self.flag, self.prog = flag, prog
        self.token = uuid.uuid4().hex
        self.held = False

    def _contents(self) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "pid": pid,
            "hostname": socket.gethostname(),
            "process_start": _process_start(pid),
            "command": _command_line(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": self.token,
        }

    def _create(self) -> bool:
        """Create the lock file atomically; False if it exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._contents(), f)
        return True

    def _remove_stale(self, seen: dict[str, Any] | None) -> None:
        """Move the stale lock aside and drop it, unless it changed since it was judged
        (then another run took it meanwhile: put it back)."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{self.token[:8]}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if _read_lock(aside) == seen:
            aside.unlink(missing_ok=True)
            return
        with contextlib.suppress(OSError):  # not the one judged stale: restore it
            os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`CommandError` naming the run that holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                atexit.register(self.release)
                return self
            info = _read_lock(self.path)
            state = _holder_state(self.path, info)
            if state != "stale":
                raise CommandError(_refusal(self.folder, self.flag, self.path, info, state))
            self._remove_stale(info)
            print(
                f"{self.prog}: note: took over the lock of {self.folder} left by "
                f"{_holder(info)}, which is no longer running",
                file=sys.stderr,
            )
        raise CommandError(
            f"{self.flag} {self.folder}: other runs keep taking its lock; wait, or choose "
            f"another {self.flag}"
        )

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.release)
        info = _read_lock(self.path)
        if info is not None and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class Owned:
    """The entries a command writes at the top of its output folder: ``names`` (files or
    folders), ``patterns`` (globs of result folders, each holding a ``meta.json``) and
    ``result_types`` (result folders of these classes, by any name). ``run.json`` is always
    owned. Only these are ever removed."""

    names: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    result_types: tuple[str, ...] = ()

    def find(self, folder: Path) -> list[Path]:
        """The owned entries present in ``folder``, sorted."""
        if not folder.is_dir():
            return []
        found = []
        for entry in sorted(folder.iterdir()):
            if entry.name in (*self.names, RECORD_FILE) or self._is_result(entry):
                found.append(entry)
        return found

    def _is_result(self, entry: Path) -> bool:
        meta = entry / "meta.json"
        if not meta.is_file():
            return False
        if any(fnmatch.fnmatchcase(entry.name, p) for p in self.patterns):
            return True
        if not self.result_types:
            return False
        try:
            kind = json.loads(meta.read_text()).get("type")
        except (OSError, ValueError, AttributeError):
            return False
        return kind in self.result_types


def read_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``OUT/run.json`` as written by :func:`claim_folder`, or None (absent or unreadable)."""
    try:
        record = json.loads((Path(folder).expanduser() / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "settings" in record else None


def _plain(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(_plain, value)) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``["--flag (saved A, now B)", ...]`` for every setting that differs."""
    return [
        f"{key} (saved {_plain(saved.get(key))}, now {_plain(now.get(key))})"
        for key in dict.fromkeys([*now, *saved])
        if saved.get(key) != now.get(key)
    ]


def resume_refusal(folder: str | os.PathLike[str], changed: Mapping[str, tuple[Any, Any]],
                   words: Mapping[str, str] | None = None) -> CommandError:  # fmt: skip
    """The one refusal of every command's ``--resume`` when settings differ from the saved
    run's: ``changed`` maps each recorded setting to ``(saved, now)``; ``words`` names a
    recorded key in the flags' words (default: ``--key``). A hash (a key ending in ``_hash``
    or ``sha256``) is named alone, its values mean nothing to a reader; any other setting
    is shown as ``--flag (saved A, now B)``."""
    named = []
    for key, (saved, now) in changed.items():
        flag = (words or {}).get(key) or (key if key.startswith("--") else f"--{key}")
        if key.endswith(("_hash", "sha256")):
            named.append(flag)
        else:
            named.append(f"{flag} (saved {_plain(saved)}, now {_plain(now)})")
    return CommandError(
        f"cannot --resume the run in {folder}: these settings differ from it: "
        f"{'; '.join(dict.fromkeys(named))}. Resume with the saved settings, or drop --resume "
        "and choose another --out to start afresh"
    )


def _as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as they read back from JSON (tuples -> lists); NaN refused."""
    return json.loads(json.dumps(dict(settings), allow_nan=False))


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (a sibling temp file renamed into place)."""
    path = folder / RECORD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _check_record(folder: Path, shown: str, flag: str, command: str, now: dict[str, Any],
                  found: list[Path]) -> None:  # fmt: skip
    """Refuse a run into a folder holding a run of other settings, or results of no record."""
    record = read_record(folder)
    if record is None:
        results = [p.name for p in found if p.name != RECORD_FILE]
        if results:
            listed = ", ".join(results[:3]) + (", ..." if len(results) > 3 else "")
            raise CommandError(
                f"{flag} {shown} holds results ({listed}) with no record of the settings that "
                f"made them (an older tyche wrote them); choose another {flag}, or pass "
                "--overwrite to replace them"
            )
        return
    saved = record.get("settings", {})
    if record.get("command") != command:
        raise CommandError(
            f"{flag} {shown} holds the results of `{record.get('command')}`; choose another "
            f"{flag}, or pass --overwrite to replace them"
        )
    differ = differences(saved, now)
    if differ:
        state = "a finished" if record.get("finished") else "an unfinished"
        raise CommandError(
            f"{flag} {shown} holds {state} run of other settings: {'; '.join(differ)}; choose "
            f"another {flag}, or pass --overwrite to replace it"
        )


class Claim:
    """A claimed output folder: the lock held and the record written (rank 0 only)."""

    def __init__(self, folder: Path, command: str, settings: dict[str, Any], lock: FolderLock
                 | None) -> None:  # fmt: skip
        self.folder, self.command, self.settings, self.lock = folder, command, settings, lock

    def record(self, finished: bool) -> None:
        if self.lock is None:
            return
        from tyche._version import __version__

        _write_record(self.folder, {"command": self.command, "finished": finished,
                                    "settings": self.settings,
                                    "tyche_version": __version__})  # fmt: skip


@contextlib.contextmanager
def claim_folder(
    folder: str | os.PathLike[str],
    command: str,
    settings: Mapping[str, Any],
    owned: Owned,
    *,
    overwrite: bool = False,
    resume: bool = False,
    flag: str = "--out",
) -> Iterator[Claim]:
    """Lock ``folder``, check it against ``settings`` (unless ``resume``), clear the old
    run's files with ``overwrite``, record the run as unfinished, and, once the body
    returns, as finished; the lock is released however the body ends.

    ``command`` names the command (``"tyche basin"``); ``settings`` maps each flag that
    changes the results to its value. Raises :class:`CommandError` for a folder in use, or
    holding a run of other settings (naming them) or results of no record, without
    ``overwrite``. A run that fails or is interrupted before writing any result leaves the
    record as it found it (a corrected rerun is not refused). Only rank 0 locks, checks and
    writes; the other ranks pass through.
    """
    path = Path(folder).expanduser()
    now = _as_json(settings)
    if _rank() != 0:
        yield Claim(path, command, now, None)
        return
    lock = FolderLock(path, flag=flag, prog=command).acquire()
    try:
        found = owned.find(path)
        if overwrite:
            _remove(found)
        elif not resume:
            _check_record(path, str(folder), flag, command, now, found)
        record = path / RECORD_FILE
        previous = record.read_bytes() if record.is_file() else None
        before = _snapshot(path, owned)
        claim = Claim(path, command, now, lock)
        claim.record(finished=False)
        try:
            yield claim
        except BaseException:
            if _snapshot(path, owned) == before:  # it wrote nothing: as if it never ran
                _restore(record, previous)
            raise
        claim.record(finished=True)
    finally:
        lock.release()


def _snapshot(folder: Path, owned: Owned) -> dict[str, tuple[int, int]]:
    """``{path: (mtime_ns, size)}`` of every file and folder owned in ``folder`` but the
    record, so a run that failed before writing anything can be told apart."""
    seen = {}
    for top in owned.find(folder):
        if top.name == RECORD_FILE:
            continue
        for entry in [top, *(top.rglob("*") if top.is_dir() else ())]:
            with contextlib.suppress(OSError):
                stat = entry.stat()
                seen[str(entry.relative_to(folder))] = (stat.st_mtime_ns, stat.st_size)
    return seen


def _restore(record: Path, previous: bytes | None) -> None:
    """Put back the record a run replaced (or remove the one it wrote)."""
    with contextlib.suppress(OSError):
        if previous is None:
            record.unlink(missing_ok=True)
        else:
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_bytes(previous)
            os.replace(tmp, record)


def check_new_file(path: str | os.PathLike[str], flag: str, overwrite: bool,
                   what: str = "file") -> None:  # fmt: skip
    """Refuse to replace an existing file unless ``overwrite`` (a one-line CommandError)."""
    file = Path(path).expanduser()
    if file.exists() and not overwrite:
        raise CommandError(
            f"{flag} {path}: a {what} is there already; choose another {flag} (e.g. "
            f"{file.with_name(file.stem + '-2' + file.suffix)}), or pass --overwrite to "
            "replace it"
        )

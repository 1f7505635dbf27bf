"""One run at a time in a run directory (and in a storage location): a lock that dies with its driver.

    with RunLock.hold(run_dir, storage, run_id=..., command="plait run ...") as lock:
        ...                                  # the run; lock.notes say whether a stale lock was taken over

The lock is a small JSON file, ``RUN_DIR/.plait.lock`` (``STORAGE/.plait.lock`` for a storage location),
naming the host, the pid (and that process's start time), the run and its command. It is created
exclusively (``O_EXCL``, atomic on local and NFS filesystems), so of two starts only one gets it; the
other is refused at once with a message naming the holder (``RunDirLocked``, exit code 2). While the
run lasts, a daemon thread refreshes the lock's heartbeat (its mtime, or a rewrite of the object on an
object store) every ``beat_s``. No ``fcntl``: advisory locks do not work on every shared filesystem,
and an object store has none.

A lock is stale, and the next start takes it over and says so, when its holder is gone: on the same
host, its pid is not running (or is another process by now); from another host (which cannot see the
pid), its heartbeat is older than ``STALE_BEATS x beat_s``. A torchrun restart of the same job (the
same ``TORCHELASTIC_RUN_ID``) takes over its earlier attempt's lock. The lock is released (deleted,
only if it is still this run's) on every way out: the end of the run, an error, Ctrl-C, SIGTERM. A
``kill -9`` leaves it behind, stale, for the next start to take over.

Object stores have no exclusive create: there the lock is written, read back after ``SETTLE_S``, and
kept only when it is still ours (two starts within that window: the later write wins, the other start
is refused); every heartbeat checks it again.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
from plait.runtime.storage_location import StorageLocation

LOCK = ".plait.lock"
BEAT_S = 5.0  # how often the holder refreshes its heartbeat
STALE_BEATS = 6  # a lock from another host is stale once its heartbeat is older than STALE_BEATS x beat_s
SETTLE_S = 2.0  # object stores: how long a written lock must stay ours before the run goes on
log = logging.getLogger("plait")


class RunDirLocked(RuntimeError):
    """Another run holds this run directory (or storage location); the message names its host and pid."""

    user_error = True
    transient = False


@dataclass
class Holder:
    """What a lock file says about the run that holds it."""

    host: str
    pid: int
    pid_started: float  # the process's start time (psutil), telling a live pid from a reused one
    started: str  # when the lock was taken, local time of the holder
    run_id: str
    command: str
    token: str  # unique per lock: which write is whose
    beat_s: float
    torchrun_id: str = ""  # TORCHELASTIC_RUN_ID of the holder, if it ran under torchrun

    @classmethod
    def me(cls, run_id: str, command: str, beat_s: float) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(),
                   time.strftime("%Y-%m-%dT%H:%M:%S"), run_id, command, secrets.token_hex(8), beat_s,
                   os.environ.get("TORCHELASTIC_RUN_ID", ""))

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            fields = json.loads(data)
            return cls(**{k: fields[k] for k in cls.__dataclass_fields__ if k in fields})
        except (ValueError, TypeError, KeyError):
            return None  # being written, or not a lock Plait wrote

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def describe(self) -> str:
        what = f" (`{self.command}`)" if self.command else ""
        return f"host {self.host}, pid {self.pid}, started {self.started}, run {self.run_id or '?'}{what}"


def stale_reason(holder: Holder | None, age_s: float, me: Holder) -> str:
    """Why the lock of ``holder`` (its heartbeat ``age_s`` old) is stale, or "" while it may be alive."""
    if holder is None:  # unreadable: a lock being written right now, or left torn by a crash
        return f"it is unreadable and {age_s:.0f}s old" if age_s > STALE_BEATS * BEAT_S else ""
    if holder.torchrun_id and holder.torchrun_id == me.torchrun_id and holder.pid != me.pid:
        return f"it is an earlier attempt of this torchrun job ({holder.torchrun_id})"
    if holder.host == me.host:
        try:
            alive = abs(psutil.Process(holder.pid).create_time() - holder.pid_started) < 1.0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            alive = False
        return "" if alive else f"its process {holder.pid} on {holder.host} is no longer running"
    limit = STALE_BEATS * holder.beat_s
    return f"its heartbeat is {age_s:.0f}s old (stale after {limit:g}s)" if age_s > limit else ""


class RunLock:
    """The lock of one folder (a run directory, or a storage location) held by this process."""

    def __init__(self, loc: StorageLocation, what: str, holder: Holder):
        self.loc, self.what, self.me = loc, what, holder
        self.notes: list[str] = []
        self.created: list[Path] = []  # local folders this lock created (removed again when left empty)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def hold(cls, run_dir: Path, storage: StorageLocation | None = None, *, run_id: str = "", command: str = "",
             beat_s: float = BEAT_S) -> "RunLocks":
        """Lock ``run_dir`` (and ``storage``, when it is another place) for this process; raises RunDirLocked."""
        me = Holder.me(run_id, command, beat_s)
        locks = RunLocks([cls(StorageLocation.parse(run_dir), f"run_dir {run_dir}", me)])
        if storage is not None and not (storage.is_local and Path(storage.root) == Path(run_dir).resolve()):
            locks.locks.append(cls(storage, f"storage {storage}", me))
        try:
            for lock in locks.locks:
                lock.acquire()
        except BaseException:
            locks.release()
            raise
        return locks

    # --- taking it -------------------------------------------------------------------------------
    def acquire(self) -> None:
        if self.loc.is_local:
            self._make_folder()
        for _ in range(5):  # each round: create it, or judge the holder; a vanished lock means try again
            if self._create():
                self._start_heartbeat()
                return
            holder, age = self._read()
            if holder is None and age is None:
                continue  # released between our try and our look
            why = stale_reason(holder, age, self.me)
            if not why:
                raise RunDirLocked(self._refusal(holder, age))
            if self._remove_if_unchanged(holder):
                who = holder.describe() if holder else "an unreadable lock"
                self.notes.append(f"{self.what}: took over the lock left by {who}: {why}")
        raise RunDirLocked(f"{self.what}: could not take its lock {self.loc.path(LOCK)} after 5 tries: other runs "
                           "keep starting there; start one run at a time")

    def _refusal(self, holder: Holder | None, age: float) -> str:
        who = holder.describe() if holder else "a run whose lock is still being written"
        return (f"{self.what} is in use by another plait run: {who}; its heartbeat is {age:.0f}s old. One run at a "
                "time per run directory: wait for it to end, stop it (Ctrl-C or `kill PID` on that host; it "
                "commits a checkpoint and releases the lock), or choose another run_dir. A lock whose run "
                f"died is taken over by the next start (at once on the same host, after {STALE_BEATS} missed "
                f"heartbeats of {BEAT_S:g}s from another host); it is {self.loc.path(LOCK)}")

    def _make_folder(self) -> None:
        folder = Path(self.loc.root)
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
        self.created = missing  # innermost first

    def _create(self) -> bool:
        """Write our lock if none exists; True when it is ours now."""
        if self.loc.is_local:
            path = self.loc.path(LOCK)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self.me.encode())
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.loc.exists(LOCK):
            return False
        self.loc.write_marker(LOCK, self.me.encode())
        time.sleep(SETTLE_S)
        holder, _ = self._read()
        if holder is None or holder.token != self.me.token:
            raise RunDirLocked(f"{self.what}: another plait run started there at the same moment "
                               f"({holder.describe() if holder else 'unknown'}): one run at a time")
        return True

    def _read(self) -> tuple[Holder | None, float | None]:
        """The lock's holder (None: unreadable) and its heartbeat's age in seconds (None: no lock)."""
        from pyarrow.fs import FileType

        try:
            info = self.loc.fs.get_file_info(self.loc.path(LOCK))
            if info.type != FileType.File:
                return None, None
            data = self.loc.read_bytes(LOCK)
        except FileNotFoundError:
            return None, None
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        return Holder.parse(data), max(0.0, time.time() - mtime)

    def _remove_if_unchanged(self, holder: Holder | None) -> bool:
        """Remove the stale lock of ``holder``, unless another start replaced it meanwhile. Locally the lock is
        renamed aside first (atomic: one start gets it) and put back when it is not the one judged stale."""
        token = holder.token if holder else None
        if not self.loc.is_local:
            now, _ = self._read()
            if (now.token if now else None) != token:
                return False
            self.loc.fs.delete_file(self.loc.path(LOCK))
            return True
        path, aside = Path(self.loc.path(LOCK)), Path(self.loc.path(f"{LOCK}.stale-{self.me.token}"))
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        taken = Holder.parse(aside.read_bytes())
        if (taken.token if taken else None) != token:  # a fresh lock of another start: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink()
        return True

    # --- keeping it --------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="plait-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.me.beat_s):
            try:
                holder, _ = self._read()
                if holder is None or holder.token != self.me.token:
                    log.warning("%s: its lock %s now names %s, not this run: another start took it over",
                                self.what, self.loc.path(LOCK), holder.describe() if holder else "nobody")
                    return
                if self.loc.is_local:
                    os.utime(self.loc.path(LOCK))
                else:
                    self.loc.write_marker(LOCK, self.me.encode())
            except Exception as e:  # noqa: BLE001 - a missed beat; the next one tries again
                log.warning("%s: refreshing the lock's heartbeat failed (%s: %s)", self.what, type(e).__name__, e)

    def release(self) -> None:
        """Stop the heartbeat; delete the lock when it is still ours; remove the folders it created, if empty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            try:
                holder, _ = self._read()
                if holder is not None and holder.token == self.me.token:
                    self.loc.fs.delete_file(self.loc.path(LOCK))
            except Exception as e:  # noqa: BLE001 - the next start judges the lock stale
                log.warning("%s: removing its lock failed (%s: %s)", self.what, type(e).__name__, e)
            self._thread = None
        for folder in self.created:
            try:
                folder.rmdir()  # only when empty: a launch that failed leaves the disk as it was
            except OSError:
                break


@dataclass
class RunLocks:
    """The locks one run holds (its run directory's, and its storage location's when that is elsewhere)."""

    locks: list[RunLock]

    @property
    def notes(self) -> list[str]:
        return [note for lock in self.locks for note in lock.notes]

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()

    def __enter__(self) -> "RunLocks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

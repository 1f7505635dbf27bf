"""plait.log: what the driver decided and printed, with timestamps.

    with DriverLog() as driver_log:          # attached to the "plait" logger for one run
        say("continuing runs/x from ...")    # prints "[plait] ..." and logs it
        driver_log.start(run_dir)            # held lines go to RUN_DIR/plait.log, later ones follow

Every ``[plait] ...`` line the driver prints goes through ``say``, so plait.log holds it too, with the
driver's other records (the spec resolved, the placement, restarts and why, checkpoints committed,
errors with their tracebacks). Lines from before the run directory starts (validation, connecting,
building data) are held in memory and written once it starts; a launch that fails before then writes
nothing. A warning logged (not said) is also shown on stderr, as a warning with no handler would be.
``CheckpointWatcher`` adds a line for each checkpoint the ranks commit, as the driver sees it appear.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from plait.runtime.checkpoint_check import committed_in

log = logging.getLogger("plait")
FORMAT = "%(asctime)s %(levelname)s %(message)s"


def say(message: str, level: int = logging.INFO) -> None:
    """Print ``[plait] message`` on the driver and log it (plait.log, once the run directory has started)."""
    print(f"[plait] {message}", flush=True)
    log.log(level, message, extra={"plait_said": True})


class DriverLog(logging.Handler):
    """The "plait" logger's handler for one run: holds records until ``start(run_dir)``, then appends them
    to ``RUN_DIR/plait.log`` with every later one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.held: list[logging.LogRecord] = []
        self.file: logging.FileHandler | None = None
        self.path: Path | None = None
        self._level = logging.NOTSET

    def __enter__(self) -> "DriverLog":
        self._level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING and not getattr(record, "plait_said", False):
            print(f"[plait] warning: {record.getMessage()}", file=sys.stderr, flush=True)
        if self.file is None:
            self.held.append(record)
        else:
            self.file.emit(record)

    def start(self, run_dir: Path) -> None:
        """The run directory exists and is this run's: write what was held, then follow."""
        if self.file is not None:
            return
        self.path = Path(run_dir) / "plait.log"
        self.file = logging.FileHandler(self.path)
        self.file.setFormatter(logging.Formatter(FORMAT))
        for record in self.held:
            self.file.emit(record)
        self.held.clear()

    def close(self) -> None:
        log.removeHandler(self)
        if log.level == logging.INFO:
            log.setLevel(self._level)
        if self.file is not None:
            self.file.close()
        super().close()


class CheckpointWatcher:
    """On the driver: logs each checkpoint committed under ``root`` (its ``meta.json`` appeared) by this run
    (``run_id``), looking every ``every_s`` from a daemon thread, and once more at ``stop``."""

    def __init__(self, root: Path, run_id: str, every_s: float = 2.0):
        self.root, self.run_id, self.every_s = Path(root), run_id, every_s
        self.seen = {p.name for p in committed_in(self.root)}  # what was there before this run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="plait-checkpoint-watch", daemon=True)

    def __enter__(self) -> "CheckpointWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.look()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.look()

    def look(self) -> None:
        import json

        for path in committed_in(self.root):
            if path.name in self.seen:
                continue
            self.seen.add(path.name)
            try:
                meta = json.loads((path / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("run_id") == self.run_id:
                at = time.strftime("%H:%M:%S", time.localtime((path / "meta.json").stat().st_mtime))
                log.info("checkpoint committed: %s (step %s, at %s)", path, meta.get("step"), at)

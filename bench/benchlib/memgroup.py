"""cgroup v1 memory groups that bound a benchmark process's page cache (Linux, root).

    if can_make_groups():
        group = MemGroup(f"plait-ooc-{name}-{os.getpid()}")   # the driver's pid last: see remove_stale_groups
        group.enter(pid)                                      # move a process in
        group.write("memory.limit_in_bytes", limit)
        group.leave(pid); group.remove()
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CG_ROOT = Path("/sys/fs/cgroup/memory")


class MemGroup:
    """A cgroup v1 memory group for one process: made, limited, filled, emptied and removed."""

    def __init__(self, name: str):
        self.path = CG_ROOT / name
        self.path.mkdir()
        self.home = None

    def write(self, key: str, value) -> None:
        (self.path / key).write_text(str(value))

    def stat(self, key: str) -> int:
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, v = line.split()
            if k == key:
                return int(v)
        return 0

    def usage_beyond_cache(self) -> int:
        """What the group holds beyond page cache (anonymous and kernel memory: the working memory)."""
        return int((self.path / "memory.usage_in_bytes").read_text()) - self.stat("cache")

    def enter(self, pid: int) -> None:
        self.home = next(line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                         if line.split(":")[1] == "memory")
        self.write("cgroup.procs", pid)

    def leave(self, pid: int) -> None:
        (CG_ROOT / self.home.lstrip("/") / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        remove_group(self.path)


def remove_group(path: Path) -> None:
    for _ in range(50):  # the last task may take a moment to leave
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def remove_stale_groups(prefix: str) -> None:
    """Groups ``<prefix>-*-<pid>`` left by a run that was killed (their driver pid is gone)."""
    for g in CG_ROOT.glob(f"{prefix}-*-*") if CG_ROOT.is_dir() else []:
        pid = g.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for task in (g / "cgroup.procs").read_text().split():
                os.kill(int(task), signal.SIGKILL)
            remove_group(g)


def can_make_groups(prefix: str) -> bool:
    try:
        MemGroup(f"{prefix}-probe-{os.getpid()}").remove()
        return True
    except OSError:
        return False

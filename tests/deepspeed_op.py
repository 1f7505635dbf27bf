"""DeepSpeed's CPU comm op (``deepspeed_shm_comm``), JIT-compiled on first use, built before the tests.

``make test`` runs this file first. Left to the tests, the first ZeRO rank compiles the op: a niced Ray worker,
which on a machine loaded several times over its cores took longer than pytest-timeout's 900 s; and a build
killed midway leaves torch's ``lock`` file in the build folder, on which every later load of the op waits
forever. Built here, in the foreground, every rank finds it ready.

The build folder is this virtual environment's own (``conftest.py`` sets ``TORCH_EXTENSIONS_DIR``): checkouts
with other environments compile against other include paths, so a shared folder was rebuilt by each in turn.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STALE_LOCK_S = 60.0


def extensions_dir() -> Path:
    """Under ~/.cache/plait/torch_extensions, one folder per virtual environment (named by its path)."""
    venv = os.path.abspath(sys.prefix).strip(os.sep).replace(os.sep, "_")
    return Path.home() / ".cache" / "plait" / "torch_extensions" / venv


def use_own_extensions_dir() -> None:
    """Point torch's JIT builds at this environment's folder, unless the caller chose one."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))


def remove_stale_lock(folder: Path) -> bool:
    """Remove ``folder/lock`` when no build holds it: it is older than ``STALE_LOCK_S`` and no process works in
    the folder (ninja and the compiler run there for the whole build). Returns whether one was removed."""
    import psutil

    lock = folder / "lock"
    if not lock.exists() or time.time() - lock.stat().st_mtime < STALE_LOCK_S:
        return False
    here = folder.resolve()
    for proc in psutil.process_iter(["cwd"]):
        if proc.info["cwd"] and Path(proc.info["cwd"]) == here:
            return False
    lock.unlink(missing_ok=True)
    return True


def build() -> None:
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    folder = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / ShareMemCommBuilder.NAME
    if remove_stale_lock(folder):
        print(f"removed {folder / 'lock'}: a build of the op was killed midway", file=sys.stderr)
    started = time.monotonic()
    ShareMemCommBuilder().load(verbose=False)
    print(f"DeepSpeed's {ShareMemCommBuilder.NAME} op is ready in {folder.parent} "
          f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    use_own_extensions_dir()
    try:
        build()
    except Exception as e:  # noqa: BLE001 - the ZeRO tests will then fail with the compiler's message themselves
        print(f"warning: could not build DeepSpeed's CPU comm op ({type(e).__name__}: {e}); the ZeRO tests will "
              "try again and report it", file=sys.stderr)

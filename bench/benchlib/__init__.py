"""Process memory figures the memory benchmarks share (Linux /proc)."""


def proc_status(field: str) -> int:
    """A /proc/self/status field in bytes, e.g. "VmRSS:" (resident now) or "VmHWM:" (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")

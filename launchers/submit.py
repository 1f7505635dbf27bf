"""Submit a job spec to a Ray cluster as a Ray job, follow its logs, report how it ended.

    python -m plait.launchers.submit --address http://HEAD:8265 examples/gpt_dp2.toml train.steps=50 \\
        --env HF_HOME=/shared/hf --working-dir .

The working directory (default: the current one; .venv, .git, runs/, data/ and what .gitignore lists
stay behind) is uploaded and the job's driver runs ``python -m plait.runtime run SPEC [overrides]``
in Ray's copy of it. Prints the job id first and the final status last; exit 0 when it SUCCEEDED,
1 otherwise (130 when you stop following: the job keeps running).

``--plait auto`` (default) asks the cluster first, with a one-line probe job, whether its Python can
import Plait; when it cannot (a bare Ray cluster), a wheel of this checkout is built (``pip wheel
--no-deps``) and its ``plait`` package is shipped through the runtime environment's ``py_modules``,
so nodes need only torch, Ray and Plait's other dependencies. ``--plait ship`` always ships it,
``--plait installed`` never does.

Token authentication (Ray >= 2.59 clusters): this machine's token (RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) is sent, as ``plait run`` does (runtime/cluster.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from plait.runtime.cluster import NO_TOKEN_HELP, ClusterError, use_token_if_available

EXCLUDES = ["runs", "data", "build", "dist", "*.egg-info", "__pycache__"]  # Ray leaves .git, .venv and .gitignore's
PROBE = "python -c 'import plait.runtime'"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def checkout_root() -> Path:
    """The source checkout Plait runs from (the folder holding pyproject.toml), for building a wheel."""
    import plait.runtime

    root = Path(plait.runtime.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ClusterError(f"Plait here is installed from {root}, not a source checkout (no pyproject.toml): "
                           "install Plait on the cluster's nodes, or submit from a checkout")
    return root


def build_plait_module(out_dir: Path) -> Path:
    """``pip wheel --no-deps`` of the checkout, unpacked: returns the ``plait`` package folder to ship. Shipped as a
    folder, not as the .whl, because Ray installs a .whl with pip and its dependencies (torch, ray, ...)."""
    wheels = out_dir / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
           str(checkout_root())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("plait-*.whl"))
    if done.returncode != 0 or not found:
        raise ClusterError(f"building a wheel of the checkout failed ({shlex.join(cmd)}): "
                           f"{(done.stderr or done.stdout).strip()[-1500:]}")
    with zipfile.ZipFile(found[-1]) as whl:
        whl.extractall(out_dir / "unpacked")
    return out_dir / "unpacked" / "plait"


def entrypoint(spec: str, overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "plait.runtime", "run", spec, *overrides])


def spec_in_working_dir(spec: str, working_dir: Path) -> str:
    """The spec's path as the job sees it: relative to the working directory, which is all the cluster gets."""
    path = Path(spec).resolve()
    if not path.is_file():
        raise ClusterError(f"spec file {spec!r} not found; pass a TOML job file such as examples/gpt_dp2.toml")
    if not path.is_relative_to(working_dir):
        raise ClusterError(f"spec {spec!r} is outside --working-dir {working_dir}: the cluster receives only the "
                           "working directory; put the spec inside it or choose a working directory holding it")
    return str(path.relative_to(working_dir))


def client_for(address: str):
    """A JobSubmissionClient, with this machine's Ray token when it has one (and a clear error when the cluster
    wants one it lacks)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")) and address.rpartition(":")[2] == "6379":
        raise ClusterError(f"--address {address!r} looks like the GCS address; `submit` talks to the dashboard "
                           "(Jobs API): give http://HOST:8265")
    token = use_token_if_available()
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token" and not token:
        raise ClusterError(f"RAY_AUTH_MODE=token is set but this machine has no Ray token for {address}: "
                           + NO_TOKEN_HELP)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise ClusterError(f"the Ray cluster at {address} refused this machine's token ({token or 'none'}): "
                           f"{NO_TOKEN_HELP}. ({str(e).splitlines()[0]})") from None
    except ConnectionError as e:
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: {e}. Check the address (the dashboard, "
                           "port 8265 unless --dashboard-port chose another) and that the cluster runs") from None


def wait_status(client, job_id: str, timeout_s: float | None = None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not (status := client.get_job_status(job_id)).is_terminal():
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(1)
    return status


def cluster_has_plait(client) -> bool:
    """A probe job: can the cluster's Python import plait.runtime without help?"""
    job_id = client.submit_job(entrypoint=PROBE, submission_id=f"plait-probe-{int(time.time() * 1000)}")
    return wait_status(client, job_id, timeout_s=300).value == "SUCCEEDED"


def runtime_env(working_dir: Path, env: dict[str, str], plait_module: Path | None) -> dict:
    # PYTHONUNBUFFERED is plait's own (its ray.init sets it): Ray refuses a job env that names it too.
    env = {k: v for k, v in env.items() if k != "PYTHONUNBUFFERED"}
    renv: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES, **({"env_vars": env} if env else {})}
    if plait_module is not None:
        renv["py_modules"] = [str(plait_module)]
    return renv


async def follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(address: str, spec: str, overrides: list[str], *, working_dir: str = ".", env: dict[str, str] | None = None,
           plait: str = "auto", wait: bool = True, submission_id: str | None = None) -> tuple[str, str]:
    """Submit; with ``wait`` follow the logs to the end. Returns ``(job id, status)``."""
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise ClusterError(f"--working-dir {working_dir!r} is not a folder")
    job_spec = spec_in_working_dir(spec, root)
    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # a line per ignored file otherwise
    client = client_for(address)
    with tempfile.TemporaryDirectory(prefix="plait-submit-") as tmp:
        ship = plait == "ship" or (plait == "auto" and not cluster_has_plait(client))
        module = build_plait_module(Path(tmp)) if ship else None
        if ship:
            print("[plait] the cluster's Python lacks Plait: shipping this checkout's wheel (py_modules)", flush=True)
        job_id = client.submit_job(entrypoint=entrypoint(job_spec, overrides), submission_id=submission_id,
                                   runtime_env=runtime_env(root, env or {}, module))
    print(f"[plait] submitted job {job_id} to {address}", flush=True)
    if not wait:
        return job_id, "PENDING"
    try:
        asyncio.run(follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\n[plait] stopped following; job {job_id} keeps running (ray job stop {job_id} ends it)",
              file=sys.stderr)
        return job_id, "FOLLOWING_STOPPED"
    status = wait_status(client, job_id)
    info = client.get_job_info(job_id)
    tail = f": {info.message}" if info.message and status.value != "SUCCEEDED" else ""
    print(f"[plait] job {job_id} {status.value}{tail}", flush=True)
    return job_id, status.value


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClusterError(f"--env {pair!r}: write it as KEY=VALUE")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="plait-submit", description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", help="section.key=value (TOML values), e.g. train.steps=20")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "") or DEFAULT_ADDRESS,
                   help=f"the cluster's dashboard (Jobs API) address (default: RAY_API_SERVER_ADDRESS, else "
                        f"{DEFAULT_ADDRESS})")
    p.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory (default .)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job (repeat)")
    p.add_argument("--plait", choices=("auto", "ship", "installed"), default="auto",
                   help="ship this checkout's Plait with the job: when the cluster lacks it (auto), always, never")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    args, extras = p.parse_known_args(argv)
    if any(e.startswith("-") for e in extras):
        p.error(f"unrecognized arguments: {' '.join(e for e in extras if e.startswith('-'))}")
    try:
        job_id, status = submit(args.address, args.spec, [*args.overrides, *extras], working_dir=args.working_dir,
                                env=parse_env(args.env), plait=args.plait, wait=not args.no_wait,
                                submission_id=args.submission_id)
    except ClusterError as e:
        print(f"plait: error: {e}", file=sys.stderr)
        return 2
    if status == "FOLLOWING_STOPPED":
        return 130
    return 0 if status in ("SUCCEEDED", "PENDING") else 1


if __name__ == "__main__":
    sys.exit(main())

"""Where a job's outputs persist: a local or shared folder, or any pyarrow filesystem URI, as Ray Train's
``RunConfig(storage_path=...)``.

    storage = "s3://bucket/team/gpt"        # spec key; also gs://, hdfs://, abfs://, a path
    loc = StorageLocation.parse(uri)         # the URI -> a pyarrow filesystem and a root inside it
    loc.child("checkpoints").upload_file(local, "step_00000040/.metadata")

The run directory stays a local staging folder (DCP writes files there); the storage location mirrors
it: ``run.json spec.json plait.log metrics.jsonl metrics.png summary.json tensorboard/ checkpoints/
earlier/``. Object stores have no rename, so a checkpoint commits there by writing its marker
(``meta.json``) last; see checkpoint.py. An S3 endpoint may come from the URI's own query
(``?endpoint_override=host:port&scheme=http``) or from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``;
``uri`` records it, so ranks reach the same endpoint. Credentials never appear in a spec or a URI: the
filesystem's own chain finds them (``AWS_ACCESS_KEY_ID``..., ``~/.aws``, an instance role, on every node).

Under ``ray job submit --working-dir``, the driver's current directory is Ray's temporary copy of the
working directory, which Ray deletes later: a relative run_dir or storage path resolves against
``$PLAIT_RUN_ROOT`` (default ``~/plait-runs``) instead (``persistent_path``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs
from plait.runtime.config import ConfigError
from plait.storage.folders import write_atomic

CHUNK = 8 << 20  # bytes per read/write when copying a file
RUN_ROOT_ENV = "PLAIT_RUN_ROOT"
DEFAULT_RUN_ROOT = "~/plait-runs"


def is_uri(text: str) -> bool:
    """``scheme://...`` other than a Windows drive letter; ``file://`` counts (it is a local path)."""
    scheme = urlsplit(str(text)).scheme
    return len(scheme) > 1 and "://" in str(text)


def _with_s3_endpoint(uri: str, env: dict[str, str]) -> str:
    """An ``s3://`` URI with the endpoint of AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL added to its query
    (pyarrow reads neither variable); a URI that names its endpoint keeps it."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if parts.scheme != "s3" or "endpoint_override" in query or not endpoint:
        return uri
    url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    query.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(frozen=True)
class StorageLocation:
    """A folder on some filesystem. ``uri`` (with any endpoint resolved) rebuilds it on another process."""

    uri: str
    fs: pafs.FileSystem
    root: str  # the folder inside ``fs`` ("bucket/prefix" on S3, an absolute path locally)

    @classmethod
    def parse(cls, uri: str | Path, env: dict[str, str] | None = None) -> "StorageLocation":
        """A pyarrow filesystem URI or a local path (``~`` expanded, relative to the current directory)."""
        text = str(uri).strip()
        if not text:
            raise ConfigError("storage is empty: give a folder or a URI such as s3://bucket/prefix")
        if not is_uri(text) or text.startswith("file://"):
            path = Path(text.removeprefix("file://")).expanduser().resolve()
            return cls(str(path), pafs.LocalFileSystem(), str(path))
        text = _with_s3_endpoint(text, dict(os.environ if env is None else env))
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"storage={str(uri)!r}: pyarrow cannot open this filesystem ({e}); use a path or "
                              "a URI pyarrow.fs.FileSystem.from_uri accepts (s3://bucket/prefix, gs://..., "
                              "hdfs://host/path)") from None
        return cls(text, fs, root.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        rel = "/".join(part for part in rel.split("/") if part)
        return f"{self.root}/{rel}" if rel else self.root

    def child(self, rel: str) -> "StorageLocation":
        parts = urlsplit(self.uri)
        uri = (urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + rel)) if is_uri(self.uri)
               else str(Path(self.uri) / rel))
        return StorageLocation(uri, self.fs, self.path(rel))

    def parent(self) -> "StorageLocation":
        parts = urlsplit(self.uri)
        uri = (urlunsplit(parts._replace(path=parts.path.rstrip("/").rsplit("/", 1)[0])) if is_uri(self.uri)
               else str(Path(self.uri).parent))
        return StorageLocation(uri, self.fs, self.root.rsplit("/", 1)[0])

    def __str__(self) -> str:
        return self.uri.split("?", 1)[0]

    # --- reading -----------------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def entries(self, rel: str = "") -> list[str]:
        """Names directly inside the folder ``rel`` (sorted; none when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def files(self, rel: str = "") -> dict[str, int]:
        """Every file under ``rel``: path relative to ``rel`` -> size in bytes."""
        base = self.path(rel)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return {info.path[len(base) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    # --- writing -----------------------------------------------------------------------------------
    def upload_file(self, local: str | Path, rel: str) -> None:
        """Copy a local file to ``rel``; readers see the old file or all of the new one (an object appears
        once its upload completes; a local file is written beside, fsynced and renamed in)."""
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            write_atomic(target, b"", src=local)
            return
        with open(local, "rb") as src, self.fs.open_output_stream(target) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)

    def upload_tree(self, local: str | Path, rel: str = "") -> None:
        """Every file under the local folder ``local`` to ``rel/...`` (symbolic links are skipped)."""
        local = Path(local)
        for file in sorted(p for p in local.rglob("*") if p.is_file() and not p.is_symlink()):
            self.upload_file(file, f"{rel}/{file.relative_to(local).as_posix()}".lstrip("/"))

    def write_marker(self, rel: str, data: bytes) -> None:
        """Write a small file so that readers see all of it or nothing: locally by temp file + rename,
        on an object store by one PUT (an object never appears half written)."""
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if not self.is_local:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        write_atomic(target, data)

    def download_tree(self, rel: str, local: str | Path) -> None:
        """Every file under ``rel`` into the local folder ``local`` (created)."""
        local = Path(local)
        for name in sorted(self.files(rel)):
            dest = local / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(self.path(f"{rel}/{name}")) as src, open(dest, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())

    def copy_tree(self, rel: str, dest_rel: str, last: tuple[str, ...] = ()) -> None:
        """Copy every file under ``rel`` to ``dest_rel`` inside this location (server-side on object stores);
        files named in ``last`` (e.g. commit markers) go after all others."""
        names = sorted(self.files(rel), key=lambda n: (n.rsplit("/", 1)[-1] in last, n))
        for name in names:
            target = self.path(f"{dest_rel}/{name}")
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(self.path(f"{rel}/{name}"), target)

    def delete_tree(self, rel: str, first: tuple[str, ...] = ()) -> None:
        """Delete ``rel`` and everything under it; files named in ``first`` (commit markers) go first, so a
        reader never sees a marker whose files are gone."""
        if not self.exists(rel):
            return
        if self.is_file(rel):
            self.fs.delete_file(self.path(rel))
            return
        for name in sorted(n for n in self.files(rel) if n.rsplit("/", 1)[-1] in first):
            self.fs.delete_file(self.path(f"{rel}/{name}"))
        self.fs.delete_dir(self.path(rel))


def ray_job_working_dir(env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Path | None:
    """Ray's temporary copy of the working directory when this process runs inside it, else None.

    ``ray job submit --working-dir DIR`` unpacks DIR under the Ray session's
    ``runtime_resources/working_dir_files/_ray_pkg_<hash>/`` and starts the entrypoint there (the job's
    driver also gets ``RAY_JOB_CONFIG_JSON_ENV_VAR``); Ray removes the copy once no job uses it."""
    cwd = Path(cwd if cwd is not None else os.getcwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i] == "runtime_resources" and parts[i + 1] == "working_dir_files":
            return Path(*parts[: i + 3])
    env = os.environ if env is None else env
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in env and any(p.startswith("_ray_pkg_") for p in parts):
        return Path(*parts[: next(i for i, p in enumerate(parts) if p.startswith("_ray_pkg_")) + 1])
    return None


def run_root(env: dict[str, str] | None = None) -> Path:
    """Where relative output paths go under a Ray job: $PLAIT_RUN_ROOT, else ~/plait-runs."""
    env = os.environ if env is None else env
    return Path(env.get(RUN_ROOT_ENV) or DEFAULT_RUN_ROOT).expanduser().resolve()


def persistent_path(path: str | Path, key: str, env: dict[str, str] | None = None,
                    cwd: str | Path | None = None) -> tuple[Path, str]:
    """``(path to use, a note or "")``. Outside a Ray job's temporary working directory a path is returned
    as given. Inside one, a relative path resolves against ``run_root()`` (with a note saying so), and an
    absolute path inside the temporary copy is refused (ConfigError): Ray deletes that folder."""
    path = Path(path).expanduser()
    temp = ray_job_working_dir(env, cwd)
    if temp is None:
        return path, ""
    if not path.is_absolute():
        root = run_root(env)
        if root.is_relative_to(temp):
            raise ConfigError(f"{RUN_ROOT_ENV}={root} lies inside Ray's temporary working directory {temp}, which "
                              "Ray deletes: set it to a persistent folder")
        moved = root / path
        return moved, (f"{key}={str(path)!r} is relative and this is a Ray job whose working directory is Ray's "
                       f"temporary copy {temp} (deleted by Ray): using {moved} instead (${RUN_ROOT_ENV} or "
                       f"{DEFAULT_RUN_ROOT}); give an absolute path or a storage URI to choose")
    if path.resolve().is_relative_to(temp):
        raise ConfigError(f"{key}={str(path)!r} lies inside Ray's temporary working directory {temp}, which Ray "
                          f"deletes after the job: give a path outside it, a relative path (it then goes under "
                          f"${RUN_ROOT_ENV}, default {DEFAULT_RUN_ROOT}), or a storage URI such as s3://bucket/prefix")
    return path, ""

"""The two storage operations `tf.io.gfile` lacks: create-only writes and one-level listing.

Everything else goes through `tf.io.gfile`. For gs:// these use google-cloud-storage (the `gcs`
extra), imported lazily: against real GCS with application default credentials, against a
local emulator when `STORAGE_EMULATOR_HOST` is set (anonymous credentials, as the emulator
needs no auth).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from typing import Any

import tensorflow as tf

from boneage_tpu.core.errors import Error

_GS = "gs://"
_INSTALL_HINT = "pip install 'boneage-tpu[gcs]'"


class StorageError(Error, RuntimeError):
    """A storage operation failed; the message says why in one line."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def _split_gs(path: str) -> tuple[str, str]:
    bucket, _, name = path[len(_GS) :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {path!r}: expected gs://BUCKET/PATH")
    return bucket, name


@functools.lru_cache(maxsize=4)
def _client(emulator_host: str) -> Any:
    try:
        from google.cloud import storage
    except ImportError as e:
        raise StorageError(f"gs:// needs google-cloud-storage ({e}): {_INSTALL_HINT}") from None
    if emulator_host:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": emulator_host},
        )
    import google.auth.exceptions

    try:
        return storage.Client()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise StorageError(
            "no Google Cloud credentials for gs://: run `gcloud auth application-default login` "
            f"or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key ({_one_line(e)})"
        ) from None


def gcs_client() -> Any:
    """Returns a cached google.cloud.storage.Client for real GCS or the local emulator."""
    return _client(os.environ.get("STORAGE_EMULATOR_HOST", ""))


def write_if_absent(path: str, data: bytes | str) -> bool:
    """Creates `path` with `data` only if nothing exists there; returns False if it did.

    The check and the write are one atomic step, so of two writers racing for the same path
    exactly one wins, and readers never see a partial file:
      gs://  one upload with the precondition `ifGenerationMatch=0` (object must not exist);
      local  data goes to a temporary file that is then hard-linked to `path`, which fails
             when `path` exists.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if path.startswith(_GS):
        return _gcs_write_if_absent(path, payload)
    if "://" in path:
        raise ValueError(f"write_if_absent supports local paths and gs:// only, got {path!r}")
    return _local_write_if_absent(path, payload)


def _gcs_write_if_absent(path: str, payload: bytes) -> bool:
    from google.api_core import exceptions

    bucket, name = _split_gs(path)
    blob = gcs_client().bucket(bucket).blob(name)
    try:
        blob.upload_from_string(payload, if_generation_match=0)
    except exceptions.PreconditionFailed:
        return False
    except exceptions.NotFound as e:
        raise StorageError(
            f"cannot write {path}: bucket gs://{bucket} not found ({_one_line(e)})"
        ) from None
    except exceptions.GoogleAPICallError as e:
        raise StorageError(f"cannot write {path}: {_one_line(e)}") from None
    return True


def _local_write_if_absent(path: str, payload: bytes) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; the file gets the mode an ordinary create would give.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # Atomic, and unlike rename it never replaces an existing file.
        except FileExistsError:
            return False
        except OSError as e:
            raise StorageError(f"cannot create {path} (needs hard-link support): {e}") from None
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def list_prefix(path: str, *, recursive: bool = False) -> list[str]:
    """Lists the paths that start with `path`, one folder level deep, sorted.

    `path` is a string prefix as in the GCS API: `gs://b/run/` lists the folder `run`,
    `gs://b/run/ckpt-` lists the `ckpt-*` entries in it. Sub-folders are returned once, with a
    trailing '/'; with `recursive=True` every file below is returned instead. gs:// takes one
    paged listing call (google-cloud-storage, `delimiter='/'`), where `tf.io.gfile.glob`
    would list everything below the prefix.
    """
    if path.startswith(_GS):
        return _gcs_list(path, recursive)
    return _gfile_list(path, recursive)


def _gcs_list(path: str, recursive: bool) -> list[str]:
    from google.api_core import exceptions

    bucket, prefix = _split_gs(path)
    blobs = gcs_client().list_blobs(bucket, prefix=prefix, delimiter=None if recursive else "/")
    try:
        # A folder's own placeholder object ("run/" made by gfile.makedirs) is not an entry.
        names = {b.name for b in blobs if not (b.name.endswith("/") and b.name == prefix)}
        names.update(blobs.prefixes)  # Filled only once the pages have been iterated.
    except exceptions.NotFound as e:
        raise FileNotFoundError(
            f"cannot list {path}: bucket gs://{bucket} not found ({e})"
        ) from None
    if recursive:
        names = {n for n in names if not n.endswith("/")}
    return sorted(f"{_GS}{bucket}/{n}" for n in names)


def _gfile_list(path: str, recursive: bool) -> list[str]:
    folder, _, start = path.rpartition("/")
    folder = folder or ("/" if path.startswith("/") else ".")
    if not tf.io.gfile.isdir(folder):
        return []
    base = "" if folder == "." and not path.startswith("./") else folder.rstrip("/") + "/"
    out = []
    for entry in tf.io.gfile.listdir(folder):
        name = entry.rstrip("/")
        if not name.startswith(start):
            continue
        full = base + name
        if not tf.io.gfile.isdir(full):
            out.append(full)
        elif recursive:
            for root, _, files in tf.io.gfile.walk(full):
                out.extend(f"{root.rstrip('/')}/{f}" for f in files)
        else:
            out.append(full + "/")
    return sorted(out)

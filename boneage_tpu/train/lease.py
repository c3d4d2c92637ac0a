"""One trainer per model directory: a lease file with owner, host, pid and a heartbeat.

`MODEL_DIR/LOCK` is created with create-only semantics (`storage.write_if_absent`: a
hard link locally, a generation precondition on gs://), so of two trainers starting on one
--model_dir exactly one gets it; the other stops with one line naming the holder. The holder
refreshes the heartbeat from a background thread every `HEARTBEAT_SECONDS` and deletes the file
when it ends. A lease whose heartbeat is older than `STALE_SECONDS` (the holder was killed or
lost its VM) is taken over with a message; so is one left on this host by a process that no
longer exists, at once (a resumed run after kill -9).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from boneage_tpu.core import model_dir as model_dir_lib
from boneage_tpu.core import storage
from boneage_tpu.core.errors import Error

LOCK_NAME = model_dir_lib.LOCK_NAME
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


class LockedError(Error, RuntimeError):
    """Another trainer holds the model directory; the message names it and what to do."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """The lease of one trainer on one model directory (acquire, heartbeat, release)."""

    def __init__(
        self,
        model_dir: str,
        *,
        stale_seconds: float = STALE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = model_dir_lib.lock_path(model_dir)
        self.model_dir = model_dir
        self.stale_seconds = stale_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self.started = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "heartbeat": self.clock(),
            }
        )

    def _read(self) -> dict[str, Any] | None:
        try:
            with tf.io.gfile.GFile(self.path, "r") as f:
                return json.loads(f.read())
        except tf.errors.NotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # Torn or foreign content: stale by definition (no heartbeat).

    def acquire(self, log: Callable[[str], None] = print) -> None:
        """Takes the lease or raises LockedError naming the holder."""
        tf.io.gfile.makedirs(self.model_dir)
        for _ in range(3):  # The holder may release or a takeover may race: look again.
            if storage.write_if_absent(self.path, self._content()):
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:
                continue  # Released just now.
            reason = self._stale_reason(holder)
            if not reason:
                age = self.clock() - float(holder.get("heartbeat", 0))
                raise LockedError(
                    f"{self.model_dir} is in use by another trainer (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago): "
                    f"one trainer per --model_dir; if that run is dead, its lock is taken over "
                    f"{self.stale_seconds:.0f} s after its last heartbeat, or delete {self.path}"
                )
            if self._remove_if_unchanged(holder):
                log(f"warning: taking over the lock of {self.model_dir}: {reason}")
        raise LockedError(f"could not take the lock {self.path}: other trainers keep racing for it")

    def _stale_reason(self, holder: dict[str, Any]) -> str:
        heartbeat = holder.get("heartbeat")
        if not isinstance(heartbeat, int | float):
            return "the lock file has no readable heartbeat"
        age = self.clock() - heartbeat
        if age > self.stale_seconds:
            return (
                f"host {holder.get('host')} pid {holder.get('pid')} sent no heartbeat for "
                f"{age:.0f} s"
            )
        pid = holder.get("pid")
        here = holder.get("host") == socket.gethostname()
        if here and isinstance(pid, int) and not _pid_alive(pid):
            return f"its process {pid} on this host no longer exists"
        return ""

    def _remove_if_unchanged(self, holder: dict[str, Any]) -> bool:
        """Deletes the lease file only if it still holds `holder` (a stale lease)."""
        if self.path.startswith("gs://"):
            return _gcs_delete_if_unchanged(self.path, holder)
        aside = f"{self.path}.{self.owner}.stale"
        try:
            os.rename(self.path, aside)  # Atomic: of two takers only one moves this file.
        except FileNotFoundError:
            return False
        try:
            with open(aside, encoding="utf-8") as f:
                moved = f.read()
            if _same_holder(moved, holder):
                return True
            # A fresh lease was created between our read and the rename: put it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="model-dir-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.heartbeat()
            except (OSError, tf.errors.OpError):
                continue  # Transient storage trouble: the next beat retries.

    def heartbeat(self) -> bool:
        """Refreshes the heartbeat if the lease is still ours; returns whether it is."""
        if self.path.startswith("gs://"):
            return _gcs_replace_if_owned(self.path, self.owner, self._content())
        holder = self._read()
        if not holder or holder.get("owner") != self.owner:
            return False
        # Local: read-check-replace is not atomic, but a takeover needs a lease STALE_SECONDS
        # old, which an owner that is still beating never has.
        temp = f"{self.path}.{self.owner}.tmp"
        with open(temp, "w", encoding="utf-8") as f:
            f.write(self._content())
        os.replace(temp, self.path)
        return True

    def holds(self) -> bool:
        """True while the lease file names this trainer."""
        holder = self._read()
        return bool(holder) and holder.get("owner") == self.owner

    def check_held(self) -> None:
        """Raises LockedError when another trainer has taken the lease over (ours went stale)."""
        holder = self._read()
        if holder and holder.get("owner") == self.owner:
            return
        who = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "nobody"
        raise LockedError(
            f"lost the lock of {self.model_dir} (now held by {who}; no heartbeat reached it for "
            f"{self.stale_seconds:.0f} s?): stopped without writing, to leave the run to one trainer"
        )

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holds():
            tf.io.gfile.remove(self.path)


def _same_holder(text: str, holder: dict[str, Any]) -> bool:
    try:
        moved = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return holder == {}
    return moved.get("owner") == holder.get("owner") and moved.get("heartbeat") == holder.get(
        "heartbeat"
    )


def _gcs_delete_if_unchanged(path: str, holder: dict[str, Any]) -> bool:
    from google.api_core import exceptions

    bucket, _, name = path[len("gs://") :].partition("/")
    blob = storage.gcs_client().bucket(bucket).get_blob(name)
    if blob is None:
        return False
    try:
        text = blob.download_as_bytes(if_generation_match=blob.generation).decode()
        if not _same_holder(text, holder):
            return False
        blob.delete(if_generation_match=blob.generation)  # Only the version we judged stale.
    except (exceptions.PreconditionFailed, exceptions.NotFound):
        return False
    return True


def _gcs_replace_if_owned(path: str, owner: str, text: str) -> bool:
    from google.api_core import exceptions

    bucket, _, name = path[len("gs://") :].partition("/")
    blob = storage.gcs_client().bucket(bucket).get_blob(name)
    if blob is None:
        return False
    try:
        held = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        if held.get("owner") != owner:
            return False
        blob.upload_from_string(text, if_generation_match=blob.generation)
    except (exceptions.GoogleAPICallError, json.JSONDecodeError):
        return False  # Taken over (precondition), gone, or a transient error: not written.
    return True

"""Worker processes that read, decode, resize and encode images for `boneage-make-tfrecords`.

Workers read local files themselves and decode, resize and encode them (`boneage_tpu.data.images`);
object-store files (gs://) are read by many threads of the main process (latency-bound) and
handed over. Results come back in input order. All file I/O goes through `tf.io.gfile`: workers
are forked, so TensorFlow is already loaded there; they use it for local reads only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator, Sequence

import tensorflow as tf

from boneage_tpu.data import crop as crop_lib
from boneage_tpu.data import images
from boneage_tpu.data.layouts import ConvertError, Row

# Fork is cheap and re-imports nothing. Elsewhere (macOS) fork is unsafe, so spawn.
_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # From <malloc.h>.
_CHUNK = 4  # Local images per worker task: amortises the per-task cost of the process pool.

# (encoded bytes, height, width, why the hand crop kept the whole image: "" when it did not).
Prepared = tuple[bytes, int, int, str] | images.ImageError


def is_remote(path: str) -> bool:
    """True for object-store paths (gs://...): no atomic rename, latency-bound reads."""
    return "://" in path


def tune_malloc() -> None:
    """Keeps freed image buffers in the heap (glibc): no page faults per decoded image.

    Once TensorFlow is loaded, glibc serves each multi-MB decode buffer with a fresh mmap, and
    the page faults cost ~1.5 ms of system time per RSNA-size image (~8% of its decode).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc; other C libraries manage memory their own way.
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def _init_worker(parent_pid: int) -> None:
    """Worker set-up: Ctrl-C is the parent's to handle, the worker dies with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        # Without it a killed converter leaves its workers blocked on the task queue forever.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # The parent died before prctl took effect.
        os._exit(1)
    tune_malloc()


def prepare_all(
    paths: Sequence[str],
    data: Sequence[bytes] | None,
    size: int,
    encoding: str,
    quality: int,
    crop: str = "none",
    crop_margin: float = crop_lib.DEFAULT_MARGIN,
) -> list[Prepared]:
    """A worker task: prepares several images (read here when `data` is None), in order.

    An unusable image comes back as its `ImageError`, so one bad file does not fail the task.
    """
    results: list[Prepared] = []
    for i, path in enumerate(paths):
        fallbacks: list[str] = []
        try:
            blob = images.read_bytes(path) if data is None else data[i]
            prepared = images.prepare(
                blob,
                path,
                size,
                encoding,
                quality,
                crop=crop,
                crop_margin=crop_margin,
                on_crop_fallback=fallbacks.append,
            )
            results.append((*prepared, "; ".join(fallbacks)))
        except images.ImageError as e:
            results.append(e)
        except (OSError, MemoryError) as e:  # This image only: skipped with the reason.
            results.append(images.ImageError(f"cannot prepare {path}: {e!r}"))
        except tf.errors.OpError as e:  # Re-raised as an error that pickles back cleanly.
            raise ConvertError(f"cannot read {path}: {e.message}") from None
    return results


class Preparer:
    """Reads and prepares images in parallel, yielding results in input order.

    Local files go to the workers in chunks of paths (they read them: shipping ~1 MB per image
    through a pipe, and one task per image, would cost the main process more CPU than all else
    it does). Object-store files are read here by many threads (latency-bound), one per task.
    `num_workers=0` does everything in this process (tests, debugging).
    """

    def __init__(
        self,
        num_workers: int,
        image_size: int,
        encoding: str,
        jpeg_quality: int,
        crop: str = "none",
        crop_margin: float = crop_lib.DEFAULT_MARGIN,
    ):
        self.num_workers = num_workers
        self.args = (image_size, encoding, jpeg_quality, crop, crop_margin)
        self.io_threads = max(8, 4 * num_workers)
        self._procs: concurrent.futures.ProcessPoolExecutor | None = None
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None

    def __enter__(self) -> Preparer:
        if self.num_workers > 0:
            context = multiprocessing.get_context(_START_METHOD)
            self._procs = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, context, initializer=_init_worker, initargs=(os.getpid(),)
            )
            # Start the workers before any reader thread exists: forking a threaded process
            # could copy a lock held by another thread.
            self._procs.submit(int, 0).result()
            self._readers = concurrent.futures.ThreadPoolExecutor(self.io_threads)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)

    def map(self, rows: Iterable[Row]) -> Iterator[tuple[Row, Prepared]]:
        """Yields (row, (bytes, height, width, crop fallback) or ImageError) per row, in order."""
        source = iter(rows)
        first = next(source, None)
        if first is None:
            return
        source = itertools.chain([first], source)
        if self._procs is None:
            for row in source:
                yield row, prepare_all([row.path], None, *self.args)[0]
            return
        remote = is_remote(first.path)
        size = 1 if remote else _CHUNK
        window = self.io_threads + 2 * self.num_workers if remote else 3 * self.num_workers
        chunks = iter(lambda: tuple(itertools.islice(source, size)), ())
        pending = collections.deque(
            (chunk, self._submit(chunk, remote)) for chunk in itertools.islice(chunks, window)
        )
        while pending:
            chunk, future = pending.popleft()
            following = next(chunks, None)
            if following is not None:
                pending.append((following, self._submit(following, remote)))
            yield from zip(chunk, self._result(chunk, future), strict=True)

    def _submit(self, chunk: tuple[Row, ...], remote: bool) -> concurrent.futures.Future:
        paths = [row.path for row in chunk]
        if not remote:
            return self._procs.submit(prepare_all, paths, None, *self.args)
        out: concurrent.futures.Future = concurrent.futures.Future()

        def relay(done: concurrent.futures.Future) -> None:
            try:
                out.set_result(done.result())
            except BaseException as e:  # Handed to the consumer, which re-raises it.
                out.set_exception(e)

        def on_read(read: concurrent.futures.Future) -> None:
            try:
                work = self._procs.submit(prepare_all, paths, [read.result()], *self.args)
            except images.ImageError as e:
                out.set_result([e])
                return
            except BaseException as e:  # Handed to the consumer, which re-raises it.
                out.set_exception(e)
                return
            work.add_done_callback(relay)

        self._readers.submit(images.read_bytes, paths[0]).add_done_callback(on_read)
        return out

    @staticmethod
    def _result(chunk: tuple[Row, ...], future: concurrent.futures.Future) -> list[Prepared]:
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool as e:
            raise ConvertError(
                f"a worker process died while preparing {chunk[0].path} (out of memory?)"
            ) from e
        except tf.errors.OpError as e:
            raise ConvertError(f"cannot read {chunk[0].path}: {e.message}") from e

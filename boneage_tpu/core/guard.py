"""Guards against hostile or careless inputs, shared by every command.

- `read_file`: every read of an input file starts with one `stat` of the opened file: it must
  be a regular file (or a symlink to one) of bounded size. FIFOs, devices and sockets are
  refused before any byte is read (a FIFO named `x.png` would block `open()` forever, a
  symlink to /dev/zero would be read until memory runs out).
- `check_outputs`: an output path that is, or is inside, an input of the same command is
  refused before any work, as is an existing output of the wrong kind (a folder where a file
  goes, a file where a folder goes): a command never overwrites what it reads.
- `csv_cell`: text cells of every CSV the project writes are neutralised against spreadsheet
  formula injection (OWASP "CSV injection"): a cell starting with `=`, `+`, `-`, `@`, a tab or
  a carriage return gets a leading `'`, so a spreadsheet shows it as text. Numbers are written
  as numbers (a negative error such as -3.2 stays -3.2).
- `printable`: control characters (terminal escape sequences, newlines) and undecodable bytes in
  a name are escaped before it is printed.

Importing this module does not import TensorFlow (only gs:// paths need it).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping

from boneage_tpu.core.errors import Error, UsageError

MB = 2**20
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class InputFileError(Error, ValueError):
    """An input that must not be read (missing, not a regular file, too large); one line."""


class OutputPathError(UsageError):
    """An output path that would overwrite an input or is of the wrong kind; one line, exit 2."""


def _kind(mode: int) -> str:
    """Names a non-regular file type for messages."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refusal(path: str, mode: int, size: int, limit: int, what: str) -> str:
    """Returns why a stat result must not be read, or ""."""
    shown = printable(path)
    if stat.S_ISDIR(mode):
        return f"{shown} is a folder, not {what}"
    if not stat.S_ISREG(mode):
        return f"{shown} is {_kind(mode)}, not a regular file: not read"
    if size > limit:
        return f"{shown} is {size:,} bytes, above the {limit / MB:g} MB limit for {what}"
    return ""


def read_file(path: str, limit: int, what: str = "a file") -> bytes:
    """Returns the bytes of a regular input file of at most `limit` bytes (local or gs://).

    A local file is opened without blocking (a FIFO does not hang) and checked with one
    `fstat` of the opened descriptor before any read: a regular file, or a symlink to one, of
    at most `limit` bytes. A gs:// object is checked with one `tf.io.gfile.stat`.

    Args:
      path: the file.
      limit: the largest size accepted, in bytes.
      what: the kind of file with its article, for messages ("an image file").

    Raises:
      InputFileError: one line: not found, permission denied, a folder, a FIFO, a device, a
        socket, above `limit`, or an I/O error.
    """
    if "://" in path:
        return _read_remote(path, limit, what)
    shown = printable(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise InputFileError(f"{what.split(' ', 1)[-1]} not found: {shown}") from e
    except PermissionError as e:
        noun = what.split(" ", 1)[-1]
        raise InputFileError(f"{noun} not readable (permission denied): {shown}") from e
    except OSError as e:
        if e.errno == errno.ENXIO:  # A socket (or a FIFO without a writer on some systems).
            raise InputFileError(
                f"{shown} is a socket or FIFO, not a regular file: not read"
            ) from e
        raise InputFileError(f"cannot read {shown}: {one_line(e)}") from e
    try:
        info = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise InputFileError(f"cannot read {shown}: {one_line(e)}") from e
    problem = _refusal(path, info.st_mode, info.st_size, limit, what)
    if problem:
        os.close(fd)
        raise InputFileError(problem)
    with os.fdopen(fd, "rb") as f:
        try:
            # Python allocates the whole count asked for before reading: asking for the
            # stat's size (+1 to see growth) costs what the file needs, not `limit` (~0.4 ms
            # per file at 256 MB). A file that grew since the stat is still bounded.
            data = f.read(info.st_size + 1)
            if len(data) > info.st_size:
                data += f.read(limit + 1 - len(data))
        except OSError as e:  # EIO, a stale NFS handle, ...
            raise InputFileError(f"cannot read {shown}: {one_line(e)}") from e
    if len(data) > limit:
        raise InputFileError(f"{shown} grew above the {limit / MB:g} MB limit for {what}")
    return data


def _read_remote(path: str, limit: int, what: str) -> bytes:
    import tensorflow as tf  # Lazily: local reads need no TensorFlow.

    noun = what.split(" ", 1)[-1]
    try:
        info = tf.io.gfile.stat(path)
        if info.is_directory:
            raise InputFileError(f"{path} is a folder, not {what}")
        if info.length > limit:
            raise InputFileError(
                f"{path} is {info.length:,} bytes, above the {limit / MB:g} MB limit for {what}"
            )
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError as e:
        raise InputFileError(f"{noun} not found: {path}") from e
    except tf.errors.PermissionDeniedError as e:
        raise InputFileError(f"{noun} not readable (permission denied): {path}") from e
    except (tf.errors.OpError, OSError) as e:
        message = e.message if isinstance(e, tf.errors.OpError) else str(e)
        raise InputFileError(f"cannot read {path}: {one_line(message)}") from e


def one_line(error: object) -> str:
    """An error's text on one line, at most 300 characters."""
    return " ".join(str(error).split())[:300]


def _normal(path: str) -> str:
    """A comparable absolute form of a local path (symlinks resolved) or of a URL."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    """Whether normalised `path` is `folder` or below it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_outputs(
    outputs: Mapping[str, tuple[str, str]],
    inputs: Mapping[str, Iterable[str]],
    *,
    may_hold_inputs: bool = False,
) -> None:
    """Refuses outputs that would overwrite an input, or that exist as the wrong kind.

    Args:
      outputs: flag -> (path, "file" | "folder"); empty paths are ignored.
      inputs: description -> paths read by the command (files or folders); an output may be
        neither one of them nor inside one of them, and no input file may be inside an output
        folder (unless `may_hold_inputs`: a folder whose own file names cannot clash).
      may_hold_inputs: allow inputs below an output folder.

    Raises:
      OutputPathError: one line naming the flag, the path and the input it would overwrite.
    """
    normal_inputs = [
        (name, path, _normal(path)) for name, paths in inputs.items() for path in paths if path
    ]
    for flag, (path, kind) in outputs.items():
        if not path:
            continue
        target = _normal(path)
        for name, original, source in normal_inputs:
            holds = kind == "folder" and not may_hold_inputs and _inside(source, target)
            if _inside(target, source) or holds:
                raise OutputPathError(
                    f"{flag} {printable(path)} would overwrite {name} {printable(original)}: "
                    f"write {'it' if kind == 'file' else 'them'} somewhere else"
                )
        _check_kind(flag, path, kind)


def _check_kind(flag: str, path: str, kind: str) -> None:
    if "://" in path:
        import tensorflow as tf  # Lazily, as above.

        exists, is_dir = tf.io.gfile.exists(path), tf.io.gfile.isdir(path)
        if exists and kind == "file" and is_dir:
            raise OutputPathError(f"{flag} {path} is a folder: give a file path")
        if exists and kind == "folder" and not is_dir:
            raise OutputPathError(f"{flag} {path} is an existing file: give a folder path")
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # Missing, or below a file: the command's own write reports it.
    if kind == "file" and not stat.S_ISREG(mode):
        raise OutputPathError(f"{flag} {printable(path)} is {_kind(mode)}: give a file path")
    if kind == "folder" and not stat.S_ISDIR(mode):
        raise OutputPathError(
            f"{flag} {printable(path)} is an existing file, not a folder: give a folder path"
        )


def csv_cell(value: object) -> object:
    """Returns a CSV cell safe to open in a spreadsheet: text starting like a formula gets `'`.

    Numbers (int, float, NumPy numbers) and None are returned unchanged, so numeric columns
    stay numeric (-3.2 is a number, not a formula).
    """
    if not isinstance(value, str):
        return value
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def csv_row(values: Iterable[object]) -> list[object]:
    """`csv_cell` applied to every cell of a row."""
    return [csv_cell(v) for v in values]


def printable(name: str) -> str:
    """Returns `name` with control characters and undecodable bytes escaped, for printing.

    Printable text (including non-ASCII letters) is kept; `\\n`, `\\x1b` (terminal escape
    sequences), other C0/C1 controls and surrogate-escaped bytes of non-UTF-8 file names
    become Python escapes.
    """
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)

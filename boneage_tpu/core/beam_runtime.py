"""Apache Beam for the converter and predict (`--runner beam`): the import and the options.

Beam is the optional `[beam]` extra and is imported only here, only when a command runs with
`--runner beam`. Without `--beam_options` a pipeline runs on Beam's local FnApiRunner with one
worker process per core: DirectRunner would first try the Prism runner, a Go binary that Beam
downloads from GitHub on first use, which an offline machine or a CI sandbox may not reach.
`--beam_options` is appended (argparse keeps the last value), so `--runner=DataflowRunner ...`
replaces the local runner.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from boneage_tpu.core.errors import Error

EXTRA = "pip install 'boneage-tpu[beam]'"
RUNNERS = ("local", "beam")


class BeamError(Error, RuntimeError):
    """Beam is missing, or its options are unusable; the message is one line."""


def import_beam() -> Any:
    """Returns the `apache_beam` module, or raises a one-line error naming the extra."""
    try:
        import apache_beam  # The optional extra, imported on demand.
    except ImportError as e:
        raise BeamError(f"--runner beam needs Apache Beam ({e}): {EXTRA}") from None
    return apache_beam


def local_workers(num_workers: int | None) -> int:
    """The local runner's worker processes: `num_workers`, else the cores this process may use."""
    if num_workers:
        return num_workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def pipeline_options(beam_options: str, num_workers: int | None = None) -> Any:
    """Returns the `PipelineOptions`: the local multi-process runner, then `beam_options`."""
    from apache_beam.options.pipeline_options import PipelineOptions

    defaults = [
        "--runner=FnApiRunner",
        "--direct_running_mode=multi_processing",
        f"--direct_num_workers={local_workers(num_workers)}",
        # Each local worker otherwise logs every bundle at INFO to the command's stderr.
        "--default_sdk_harness_log_level=WARNING",
    ]
    try:
        extra = shlex.split(beam_options)
    except ValueError as e:
        raise BeamError(f"--beam_options {beam_options!r}: {e}") from None
    return PipelineOptions([*defaults, *extra])


def runner_name(options: Any) -> str:
    """The runner a pipeline with `options` runs on (for the one-line progress message)."""
    from apache_beam.options.pipeline_options import StandardOptions

    return str(options.view_as(StandardOptions).runner)

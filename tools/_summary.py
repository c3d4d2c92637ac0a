"""The benchmarks' common tail: print the figures, and write them to `--json` when given."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def write_json(summary: Mapping[str, Any], json_path: str) -> None:
    """Writes the summary as one indented JSON object to `json_path` ("": nothing is written).

    Args:
      summary: the benchmark's figures (JSON-serialisable).
      json_path: a local path, or a URL such as gs://... (written through tf.io.gfile).
    """
    if not json_path:
        return
    text = json.dumps(summary, indent=2) + "\n"
    if "://" in json_path:
        # Only a URL needs TensorFlow's file system; a local path must not pay its import.
        import tensorflow as tf

        with tf.io.gfile.GFile(json_path, "w") as f:
            f.write(text)
        return
    with open(json_path, "w", encoding="utf-8") as f:
        f.write(text)


def report(summary: Mapping[str, Any], json_path: str, width: int = 40) -> None:
    """Prints one `key: value` line per figure, keys right-aligned, then writes `--json`.

    Args:
      summary: the benchmark's figures, printed in their order.
      json_path: where `write_json` writes them ("": nowhere).
      width: the column the keys are right-aligned to.
    """
    for key, value in summary.items():
        print(f"{key:>{width}}: {value}")
    write_json(summary, json_path)

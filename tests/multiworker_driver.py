"""One worker of a local multi-worker training cluster, for tests/test_multiworker.py.

    python -m tests.multiworker_driver INDEX PORT,PORT KILL_AT TRAIN_FLAGS...

Sets TF_CONFIG for worker INDEX of a cluster on 127.0.0.1 and runs `boneage_tpu.train` with
TRAIN_FLAGS. After every loop it prints `weights STEP TRAINABLE ALL`: float64 sums of |w| over
the trainable weights and over all weights (batch-norm moving statistics are per worker
between synchronisations); with KILL_AT > 0 it ends the process at once after the loop of step KILL_AT,
without cleanup, as a kill would (exit status 17).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    index, ports, kill_at, *flags = sys.argv[1:]
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports.split(",")]},
            "task": {"type": "worker", "index": int(index)},
        }
    )
    import numpy as np

    from boneage_tpu.cli import train as job
    from boneage_tpu.train import setup

    built = []
    build_model = setup.build_model

    def capture(*args, **kwargs):  # The trainer's model, for the checksums.
        built.append(build_model(*args, **kwargs))
        return built[-1]

    setup.build_model = capture

    def after_loop(step: int) -> None:
        model = built[-1]
        trainable, every = (
            sum(float(np.abs(np.asarray(w, np.float64)).sum()) for w in weights)
            for weights in (model.trainable_weights, model.weights)
        )
        print(f"weights {step} {trainable:.10e} {every:.10e}", flush=True)
        if int(kill_at) and step >= int(kill_at):
            os._exit(17)

    return job.main(["train", *flags], after_loop=after_loop)


if __name__ == "__main__":
    sys.exit(main())

"""One function from the --tpu / --virtual_cpus flags (and TF_CONFIG) to a tf.distribute.Strategy.

  --tpu=colab          Colab's TPU: COLAB_TPU_ADDR set (old TPU-node runtime) -> grpc://ADDR,
                       otherwise the TPU-VM runtime ("local").
  --tpu=local          this machine is a TPU VM (needs TensorFlow's TPU build: tensorflow-tpu +
                       libtpu, or a TPU VM image's tensorflow + /lib/libtpu.so); one host only.
  --tpu=NAME|grpc://.. a named TPU: a remote TPU node (the old TPU-node architecture, whose host
                       reads data and writes checkpoints itself, so paths must be gs://) or a
                       TPU VM pod slice driven from its worker 0.
The runtime (PJRT for v4 and newer, StreamExecutor for v2/v3) is chosen before TensorFlow is
imported, by `boneage_tpu.core.tpu_runtime` from each command's entry point.
  no --tpu             TF_CONFIG set -> MultiWorkerMirroredStrategy; >1 GPU -> MirroredStrategy;
                       1 GPU -> OneDeviceStrategy (input prefetched to the GPU);
                       --virtual_cpus=N -> the CPU split into N logical devices under
                       MirroredStrategy (multi-replica code on a laptop and in CI); else the
                       default strategy (one device).
A TPU that fails to initialise raises `DistributeError`: there is no silent CPU fallback.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from boneage_tpu.core import cpu_features, tpu_runtime
from boneage_tpu.core.config import RuntimeConfig
from boneage_tpu.core.errors import Error, UsageError

# The pins of setup.cfg's `tpu` extra (tests check they agree).
TPU_INSTALL_HINT = (
    "pip install tensorflow-tpu==2.20.0 libtpu==0.0.14 "
    "-f https://storage.googleapis.com/libtpu-tf-releases/index.html"
)
TPU_TENSORFLOW_DISTRIBUTIONS = tpu_runtime.TPU_TENSORFLOW_DISTRIBUTIONS


class DistributeError(Error, RuntimeError):
    """Raised when the requested devices cannot be used (one readable line)."""


def tpu_kind(tpu: str) -> str:
    """Classifies a --tpu value: "" (none), "vm" (this machine's TPU) or "remote" (a TPU node)."""
    if not tpu:
        return ""
    if tpu == "colab":
        return "remote" if os.environ.get("COLAB_TPU_ADDR") else "vm"
    return "vm" if tpu == "local" else "remote"


def tpu_address(tpu: str) -> str:
    """Returns the TPUClusterResolver argument for a --tpu value (resolves "colab")."""
    if tpu == "colab":
        addr = os.environ.get("COLAB_TPU_ADDR", "")
        return f"grpc://{addr}" if addr else "local"
    return tpu


def check_paths(tpu: str, paths: Mapping[str, str]) -> list[str]:
    """Checks data/model paths against the TPU kind, before any TPU is contacted.

    Args:
      tpu: the --tpu value.
      paths: flag name -> path, e.g. {"--data": ..., "--model_dir": ...}; empty paths are ignored.

    Returns:
      Warnings to print (a local --model_dir on a TPU VM vanishes with the VM).

    Raises:
      DistributeError: a remote TPU node with a local path (its host reads only gs://).
    """
    kind = tpu_kind(tpu)
    local = {flag: p for flag, p in paths.items() if p and not p.startswith("gs://")}
    if kind == "remote" and local:
        flag, path = next(iter(local.items()))
        raise DistributeError(
            f"{flag} {path} is a local path, but the TPU at {tpu_address(tpu)} is a remote TPU "
            "node whose workers read only gs:// (copy it to a bucket: gcloud storage cp -r)"
        )
    if kind == "vm" and "--model_dir" in local:
        return [
            f"--model_dir {local['--model_dir']} is local: checkpoints vanish with the TPU VM; "
            "use gs://BUCKET/... to keep them"
        ]
    return []


def has_tpu_build() -> bool:
    """Returns True when TensorFlow's TPU build is installed (`tpu_runtime.find_tpu_build`).

    libtpu alone is not enough: `jax[tpu]` installs it too, next to a CPU-only TensorFlow.
    """
    return tpu_runtime.find_tpu_build() is not None


def _installed_tensorflow() -> str:
    for dist in ("tensorflow-tpu", "tensorflow-cpu", "tensorflow", "tf-nightly"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"TensorFlow {tf.__version__}"


def configure_virtual_cpus(count: int) -> list[str]:
    """Splits the first physical CPU into `count` logical devices and returns their names.

    Must run before TensorFlow initialises its devices (before the first op); afterwards it
    succeeds only if the process already has at least `count` logical CPUs.
    """
    if count < 1:
        raise DistributeError(f"--virtual_cpus must be >= 1, got {count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) < count:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
            )
        except RuntimeError as err:
            have = len(tf.config.list_logical_devices("CPU"))
            raise DistributeError(
                f"--virtual_cpus={count}: TensorFlow already started with {have} CPU device(s); "
                "split the CPU before the first TensorFlow op"
            ) from err
    return [d.name for d in tf.config.list_logical_devices("CPU")[:count]]


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    address = tpu_address(tpu)
    if address == "local" and not has_tpu_build():
        raise DistributeError(
            f"--tpu={tpu} needs TensorFlow's TPU build, but this Python has "
            f"{_installed_tensorflow()} without libtpu: {TPU_INSTALL_HINT}"
        )
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=address)
        if address != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as err:
        reason = " ".join(str(err).split())[:300]
        raise DistributeError(f"could not initialise the TPU {address!r}: {reason}") from err


def make_strategy(tpu: str = "", virtual_cpus: int = 0) -> tf.distribute.Strategy:
    """Returns the strategy for the --tpu / --virtual_cpus flags and the environment.

    Args:
      tpu: "", "colab", "local", a TPU name or a grpc:// address.
      virtual_cpus: >0 (and no TPU): that many logical CPU devices under MirroredStrategy
        (1 gives the default one-device strategy).

    Raises:
      DistributeError: conflicting flags, a missing TPU build or a TPU that does not start.
    """
    if tpu and virtual_cpus:
        raise DistributeError("--tpu and --virtual_cpus exclude each other")
    if tpu:
        return _tpu_strategy(tpu)
    if os.environ.get("TF_CONFIG"):
        try:
            json.loads(os.environ["TF_CONFIG"])
        except json.JSONDecodeError as err:
            raise DistributeError(f"TF_CONFIG is not valid JSON: {err}") from err
        return tf.distribute.MultiWorkerMirroredStrategy()
    if virtual_cpus > 1:
        # Reductions through one device instead of collective ops: collective keys restart
        # with every MirroredStrategy, so a second virtual-CPU strategy in one process (tests)
        # would meet the first's collectives; the replica maths are the same either way.
        return tf.distribute.MirroredStrategy(
            configure_virtual_cpus(virtual_cpus),
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    if virtual_cpus == 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if len(gpus) == 1:
        # Not the default strategy: OneDeviceStrategy's distributed datasets prefetch the next
        # batches into GPU memory while the current step runs.
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()


def worker_name(strategy: tf.distribute.Strategy) -> str:
    """Returns "" for the chief (or a single-worker strategy), else e.g. "worker-1".

    Under MultiWorkerMirroredStrategy every worker must take part in each checkpoint save and
    export, but only the chief may write the shared model directory; the others write their
    copies into a private folder (`model_dir.worker_dir`) and delete them.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return ""
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None or task_type == "chief":
        return ""
    if task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict():
        return ""
    return f"{task_type}-{task_id}"


def gpu_compute_capability() -> tuple[int, int] | None:
    """Returns the smallest compute capability of this machine's GPUs, None without GPUs."""
    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability", (0, 0))))
    return min(capabilities) if capabilities else None


def platform(strategy: tf.distribute.Strategy) -> str:
    """Returns "tpu", "gpu" or "cpu": the kind of device the strategy's replicas run on."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # The default strategy has no device list: ops go to TF's default.
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
    return "gpu" if any("GPU" in d.upper() for d in devices) else "cpu"


def describe(strategy: tf.distribute.Strategy) -> str:
    """Returns a one-line description, e.g. "MirroredStrategy: 8 replicas on cpu"."""
    replicas = strategy.num_replicas_in_sync
    plural = "replica" if replicas == 1 else "replicas"
    return f"{type(strategy).__name__}: {replicas} {plural} on {platform(strategy)}"


# "auto" precision per platform; GPUs of compute capability >= 8.0 get bf16 instead of fp16.
DEFAULT_PRECISION = {"tpu": "bf16", "gpu": "fp16", "cpu": "fp32"}


def resolve_runtime(
    runtime: RuntimeConfig,
    platform: str,
    replicas: int = 1,
    cpu: cpu_features.Bf16Support | None = None,
) -> dict[str, Any]:
    """Resolves the "auto" precision and XLA settings of train and evaluate for the platform.

    Args:
      runtime: the run's runtime settings.
      platform: "tpu", "gpu" or "cpu" (`platform`).
      replicas: replicas in sync (one replica compiles its whole training step).
      cpu: on CPU, its bfloat16 features (default: `cpu_features.detect()`); with
        `runtime.cpu_bf16` they decide the "auto" precision.

    Returns:
      {"precision": fp32 | bf16 | fp16, "jit_compile": wrap the replica's work in
      jit_compile=True, "xla": what of a training step runs under XLA, for the log,
      "cpu_hardware": on CPU the bf16 hardware it has, for the first log line ("" elsewhere)}.

    Raises:
      UsageError: fp16 on a TPU.
    """
    precision = runtime.precision
    if platform == "cpu":
        cpu = cpu or cpu_features.detect()
    if precision == "auto":
        precision = DEFAULT_PRECISION[platform]
        # Emulated bf16 is slower than fp32, so only CPUs with bf16 arithmetic are switched.
        if platform == "cpu" and runtime.cpu_bf16 and cpu is not None and cpu.fast:
            precision = "bf16"
        # Ampere (8.0) and newer run bf16 at fp16 speed with fp32's range: no loss scaling,
        # hence no overflow-skipped steps.
        capability = gpu_compute_capability() if platform == "gpu" else None
        if capability is not None and capability >= (8, 0):
            precision = "bf16"
    if platform == "tpu" and precision == "fp16":
        raise UsageError(
            "--precision fp16 is not supported on TPU (no fp16 matrix units): use bf16 (auto) "
            "or fp32"
        )
    if platform == "tpu":
        # A TPU compiles the whole replica step with XLA anyway; no extra jit wrapper.
        return {"precision": precision, "jit_compile": False, "xla": "whole step (TPU)"}
    # auto: on for GPUs; off on CPU, where XLA is slower than TF's oneDNN kernels (tiny at
    # 128 px: 238 vs 375 img/s) and compiles every virtual device separately.
    jit = platform == "gpu" if runtime.jit_compile == "auto" else runtime.jit_compile == "yes"
    # One replica compiles its optimizer update too; several all-reduce the gradients in the
    # optimizer, outside XLA (`train.loop`).
    xla = ("whole step" if replicas == 1 else "augment to gradients") if jit else "off"
    described = cpu.describe() if platform == "cpu" and cpu is not None else ""
    return {"precision": precision, "jit_compile": jit, "xla": xla, "cpu_hardware": described}

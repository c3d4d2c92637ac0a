"""The TPU runtime a process needs, chosen before TensorFlow is imported (imports no TensorFlow).

TensorFlow reads these at import, so a command sets them first (`prepare`, from each
command's entry point):
  PJRT (v4 and newer: v4, v5e, v5p, v6e): NEXT_PLUGGABLE_DEVICE_USE_C_API=true and
    TF_PLUGGABLE_DEVICE_LIBRARY_PATH=<libtpu.so>; v5e/v5p/v6e start only this way (Cloud TPU
    runtime docs since TF 2.15; keras-io's TPU examples for tensorflow-tpu 2.19).
  StreamExecutor (v2, v3): nothing to set; TensorFlow dlopens TPU_LIBRARY_PATH or "libtpu.so".
  A client of a named TPU (`--tpu=NAME`, e.g. worker 0 of a pod slice driving every worker's
    TPU server): TPU_LOAD_LIBRARY=0, or the client grabs its own host's chips
    (tpu_initializer_helper.cc: "TPU_LOAD_LIBRARY=0, not loading libtpu").
Values already in the environment win. Everything reads injectable paths and functions, so
the tests fake installs and machines.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, MutableMapping, Sequence

from boneage_tpu.core.errors import Error

# Google's TPU VM images install libtpu here (next to a TPU build named `tensorflow`).
SYSTEM_LIBTPU = "/lib/libtpu.so"
# PCI device ids of TPU chips (vendor 0x1ae0), as JAX's hardware_utils reads them.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = {
    "0x0027": "v2/v3",
    "0x005e": "v4",
    "0x0062": "v5p",
    "0x0063": "v5e",
    "0x006f": "v6e",
    "0x0076": "v7",
}
# Generations whose TensorFlow runtime is StreamExecutor; every other one runs PJRT.
STREAM_EXECUTOR_GENERATIONS = ("v2/v3",)
METADATA_URL = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
# Distributions of TensorFlow's TPU build; JAX's libtpu alone does not make TensorFlow use a TPU.
TPU_TENSORFLOW_DISTRIBUTIONS = ("tensorflow-tpu", "tf-nightly-tpu")


class TpuRuntimeError(Error, RuntimeError):
    """This process cannot use the requested TPU this way (one readable line)."""


@dataclasses.dataclass(frozen=True)
class TpuBuild:
    """An installed TPU build of TensorFlow.

    Attributes:
      tensorflow: the TensorFlow distribution and version, e.g. "tensorflow-tpu 2.20.0".
      library: the libtpu.so TensorFlow loads.
      how: which documented install it is, e.g. "tensorflow-tpu wheel + libtpu module".
    """

    tensorflow: str
    library: str
    how: str


def _version(name: str, version: Callable[[str], str]) -> str:
    try:
        return version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _libtpu_module_library(find_spec: Callable[[str], object]) -> str:
    spec = find_spec("libtpu")
    if spec is None:
        return ""
    # The wheel ships libtpu.so inside its package (what libtpu.get_library_path() returns).
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    return os.path.join(locations[0], "libtpu.so") if locations else "libtpu.so"


def find_tpu_build(
    environ: Mapping[str, str] | None = None,
    *,
    version: Callable[[str], str] | None = None,
    find_spec: Callable[[str], object] | None = None,
    system_library: str = SYSTEM_LIBTPU,
) -> TpuBuild | None:
    """Returns the installed TPU build of TensorFlow, or None.

    Accepts every documented install: the tensorflow-tpu wheel with the libtpu module (pip,
    Colab), TPU_LIBRARY_PATH naming a libtpu.so, and Google's TPU VM images (the TPU build
    installed as `tensorflow`, libtpu.so in /lib). Refuses a libtpu module beside a plain
    `tensorflow` or `tensorflow-cpu`: `jax[tpu]` installs exactly that.
    """
    environ = os.environ if environ is None else environ
    version = version or importlib.metadata.version
    find_spec = find_spec or importlib.util.find_spec
    tpu_wheel = ""
    for dist in TPU_TENSORFLOW_DISTRIBUTIONS:
        if found := _version(dist, version):
            tpu_wheel = f"{dist} {found}"
            break
    plain = _version("tensorflow", version)
    tensorflow = tpu_wheel or (f"tensorflow {plain}" if plain else "")
    if not tensorflow:
        return None
    explicit = environ.get("TPU_LIBRARY_PATH", "")
    if explicit:
        return (
            TpuBuild(tensorflow, explicit, "TPU_LIBRARY_PATH") if os.path.exists(explicit) else None
        )
    if tpu_wheel:
        module = _libtpu_module_library(find_spec)
        if module:
            return TpuBuild(tensorflow, module, "tensorflow-tpu wheel + libtpu module")
        if os.path.exists(system_library):
            return TpuBuild(tensorflow, system_library, f"tensorflow-tpu wheel + {system_library}")
        return None
    if os.path.exists(system_library):
        return TpuBuild(tensorflow, system_library, f"TPU VM image: tensorflow + {system_library}")
    return None


def tpu_generation(pci_root: str = "/sys/bus/pci/devices") -> tuple[str, int]:
    """Returns this host's TPU generation (e.g. "v5e", "" without TPU chips) and chip count."""
    generation, chips = "", 0
    for vendor_path in sorted(glob.glob(os.path.join(pci_root, "*", "vendor"))):
        with open(vendor_path, encoding="ascii") as f:
            if f.read().strip() != GOOGLE_PCI_VENDOR:
                continue
        with open(os.path.join(os.path.dirname(vendor_path), "device"), encoding="ascii") as f:
            device = f.read().strip()
        if device in TPU_PCI_DEVICES:
            generation, chips = TPU_PCI_DEVICES[device], chips + 1
    return generation, chips


def generation_of(accelerator_type: str) -> str:
    """Maps an accelerator type ("v2-8", "v5litepod-1", "v6e-8") to a generation, "" if unknown."""
    name = accelerator_type.lower()
    for prefix, generation in (
        ("v2", "v2/v3"),
        ("v3", "v2/v3"),
        ("v4", "v4"),
        ("v5litepod", "v5e"),
        ("v5e", "v5e"),
        ("v5p", "v5p"),
        ("v6e", "v6e"),
    ):
        if name.startswith(prefix):
            return generation
    return ""


def read_metadata(attribute: str, timeout: float = 2.0) -> str:
    """Returns a TPU VM metadata attribute ("" off Google Cloud or when it is not set)."""
    request = urllib.request.Request(
        METADATA_URL + attribute, headers={"Metadata-Flavor": "Google"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode("utf-8").strip()
    except (urllib.error.URLError, OSError):
        # Not a Google Cloud VM (or no such attribute): the slice is taken as one host.
        return ""


def slice_hosts(environ: Mapping[str, str], metadata: Callable[[str], str]) -> int:
    """Returns how many hosts the TPU slice this machine belongs to has (1 when unknown)."""
    hostnames = environ.get("TPU_WORKER_HOSTNAMES", "")
    endpoints = hostnames or metadata("worker-network-endpoints")
    return max(1, len([e for e in endpoints.split(",") if e.strip()]))


def tpu_flag(argv: Sequence[str]) -> str:
    """Returns the value of --tpu in a command line (flag files included), "" without it."""
    value = ""
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if arg in ("--tpu", "-tpu") and args:
            value = args.pop(0)
        elif arg.startswith(("--tpu=", "-tpu=")):
            value = arg.split("=", 1)[1]
        elif arg.startswith(("--flagfile=", "-flagfile=")):
            path = arg.split("=", 1)[1]
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    lines = [line.strip() for line in f if line.strip()]
                found = tpu_flag(["", *(line for line in lines if not line.startswith("#"))])
                value = found or value
    return value


@dataclasses.dataclass(frozen=True)
class RuntimeChoice:
    """What `prepare` decided: the runtime ("pjrt", "se", "client" or "" without a TPU), the
    TPU generation it saw, the TPU build it found, and the variables it set."""

    runtime: str
    generation: str
    build: TpuBuild | None
    set_variables: dict[str, str]

    def describe(self) -> str:
        """Returns one log line, e.g. "TPU v5e: PJRT runtime, tensorflow-tpu 2.20.0 (...)"."""
        if not self.runtime:
            return ""
        if self.runtime == "client":
            return "TPU client of a named TPU: TPU_LOAD_LIBRARY=0 (this process loads no libtpu)"
        name = {"pjrt": "PJRT", "se": "StreamExecutor"}[self.runtime]
        build = f"{self.build.tensorflow} ({self.build.how})" if self.build else "no TPU build"
        return f"TPU {self.generation or '(generation unknown)'}: {name} runtime, {build}"


def prepare(
    argv: Sequence[str],
    environ: MutableMapping[str, str] | None = None,
    *,
    pci_root: str = "/sys/bus/pci/devices",
    metadata: Callable[[str], str] = read_metadata,
    find_build: Callable[[], TpuBuild | None] | None = None,
    modules: Mapping[str, object] | None = None,
) -> RuntimeChoice:
    """Sets the TPU runtime's environment variables for a command line; call before TensorFlow.

    Args:
      argv: the command line (its --tpu decides: none, this machine's TPU, or a named TPU).
      environ: the environment to read and update (os.environ).
      pci_root, metadata, find_build, modules: injectable machine facts (tests).

    Raises:
      TpuRuntimeError: `--tpu=local` on one host of a multi-host slice (it would see only this
        host's chips), a PJRT TPU asked for after TensorFlow was already imported, or a bad
        BONEAGE_TPU_RUNTIME (pjrt | se: overrides the generation's default, e.g. for a v4).
    """
    environ = os.environ if environ is None else environ
    modules = __import__("sys").modules if modules is None else modules
    find_build = find_build or (lambda: find_tpu_build(environ))
    tpu = tpu_flag(argv)
    if not tpu:
        return RuntimeChoice("", "", None, {})
    remote = tpu not in ("local", "colab") or (tpu == "colab" and environ.get("COLAB_TPU_ADDR"))
    changed: dict[str, str] = {}

    def set_default(name: str, value: str) -> None:
        if name not in environ:
            environ[name] = changed[name] = value

    if remote:
        set_default("TPU_LOAD_LIBRARY", "0")
        return RuntimeChoice("client", "", None, changed)
    generation, chips = tpu_generation(pci_root)
    if chips and tpu == "local" and (hosts := slice_hosts(environ, metadata)) > 1:
        raise TpuRuntimeError(
            f"--tpu=local on a {hosts}-host TPU slice sees only this host's {chips} chips: on "
            "worker 0 run the same command with --tpu=<the TPU's name> (it drives every "
            "worker; see README 'TPU pod slices')"
        )
    if not generation:
        generation = generation_of(environ.get("TPU_ACCELERATOR_TYPE", ""))
    build = find_build()
    runtime = environ.get("BONEAGE_TPU_RUNTIME", "")
    if runtime not in ("", "pjrt", "se"):
        raise TpuRuntimeError(f"BONEAGE_TPU_RUNTIME={runtime}: use pjrt or se (or leave it unset)")
    if not runtime:
        # No TPU seen (a container without /sys, or no TPU at all): TensorFlow's default
        # (StreamExecutor), which `distribute` reports clearly if it fails.
        runtime = "pjrt" if generation and generation not in STREAM_EXECUTOR_GENERATIONS else "se"
    if runtime == "se" or build is None:
        # Without a TPU build `distribute` refuses with the install line.
        return RuntimeChoice(runtime, generation, build, changed)
    wanted = {
        "NEXT_PLUGGABLE_DEVICE_USE_C_API": "true",
        "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": build.library,
    }
    missing = [name for name in wanted if not environ.get(name)]
    if "tensorflow" in modules and missing:
        raise TpuRuntimeError(
            f"TPU {generation or ''} needs the PJRT runtime, but TensorFlow was imported before "
            f"it could be selected: set NEXT_PLUGGABLE_DEVICE_USE_C_API=true and "
            f"TF_PLUGGABLE_DEVICE_LIBRARY_PATH={build.library} before importing TensorFlow"
        )
    for name in missing:
        set_default(name, wanted[name])
    return RuntimeChoice("pjrt", generation, build, changed)


def prepare_command(prog: str, argv: Sequence[str]) -> None:
    """`prepare` for a command's entry point: prints its choice, or one error line and exits 1."""
    import sys

    try:
        choice = prepare(argv)
    except TpuRuntimeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if choice.runtime:
        print(choice.describe(), flush=True)

"""Tests of the TPU runtime choice made before TensorFlow is imported, on faked installs and hosts."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys
import types

import pytest

from boneage_tpu import cli
from boneage_tpu.core import tpu_runtime
from tests.conftest import REPO_ROOT


def _versions(**installed: str):
    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    return version


def _libtpu_module(folder: pathlib.Path | None):
    spec = types.SimpleNamespace(submodule_search_locations=[str(folder)]) if folder else None
    return lambda name: spec if name == "libtpu" else None


def _pci(root: pathlib.Path, *devices: tuple[str, str]) -> str:
    for i, (vendor, device) in enumerate(devices):
        slot = root / f"0000:00:{i:02x}.0"
        slot.mkdir(parents=True)
        (slot / "vendor").write_text(vendor + "\n")
        (slot / "device").write_text(device + "\n")
    return str(root)


def test_every_documented_tpu_install_is_found_and_named(tmp_path):
    module = tmp_path / "site" / "libtpu"
    module.mkdir(parents=True)
    system = tmp_path / "lib" / "libtpu.so"
    system.parent.mkdir()
    explicit = tmp_path / "custom" / "libtpu.so"
    explicit.parent.mkdir()
    explicit.write_bytes(b"")
    missing = str(tmp_path / "no" / "libtpu.so")

    def find(env=None, system_library=missing, spec=None, **installed):
        return tpu_runtime.find_tpu_build(
            env or {},
            version=_versions(**installed),
            find_spec=spec or _libtpu_module(None),
            system_library=system_library,
        )

    wheel = find(spec=_libtpu_module(module), **{"tensorflow-tpu": "2.20.0"})
    assert wheel == tpu_runtime.TpuBuild(
        "tensorflow-tpu 2.20.0", str(module / "libtpu.so"), "tensorflow-tpu wheel + libtpu module"
    )
    system.write_bytes(b"")
    image = find(system_library=str(system), tensorflow="2.20.0")
    assert image.how == f"TPU VM image: tensorflow + {system}" and image.library == str(system)
    by_path = find({"TPU_LIBRARY_PATH": str(explicit)}, tensorflow="2.20.0")
    assert (by_path.how, by_path.library) == ("TPU_LIBRARY_PATH", str(explicit))
    # Refused: jax[tpu]'s libtpu beside a CPU TensorFlow, tensorflow-cpu, a missing library.
    assert find(spec=_libtpu_module(module), tensorflow="2.21.0") is None
    assert find(system_library=str(system), **{"tensorflow-cpu": "2.21.0"}) is None
    assert find({"TPU_LIBRARY_PATH": missing}, **{"tensorflow-tpu": "2.20.0"}) is None
    assert find(**{"tensorflow-tpu": "2.20.0"}) is None


def test_tpu_generation_reads_the_pci_ids(tmp_path):
    root = _pci(tmp_path / "pci", ("0x8086", "0x0063"), *[("0x1ae0", "0x0063")] * 4)
    assert tpu_runtime.tpu_generation(root) == ("v5e", 4)
    assert tpu_runtime.tpu_generation(_pci(tmp_path / "v2", ("0x1ae0", "0x0027"))) == ("v2/v3", 1)
    assert tpu_runtime.tpu_generation(str(tmp_path / "none")) == ("", 0)
    assert tpu_runtime.generation_of("v5litepod-8") == "v5e"
    assert tpu_runtime.generation_of("v3-32") == "v2/v3"
    assert tpu_runtime.generation_of("v6e-1") == "v6e"
    assert tpu_runtime.generation_of("") == ""


def test_tpu_flag_is_read_from_the_command_line_and_flag_files(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("# comment\n--tpu=my-pod\n--batch_size=8\n")
    assert tpu_runtime.tpu_flag(["train", "--tpu=local"]) == "local"
    assert tpu_runtime.tpu_flag(["train", "--tpu", "colab", "--data=x"]) == "colab"
    assert tpu_runtime.tpu_flag(["train", f"--flagfile={flagfile}"]) == "my-pod"
    assert tpu_runtime.tpu_flag(["train", f"--flagfile={flagfile}", "--tpu=local"]) == "local"
    assert tpu_runtime.tpu_flag(["train", "--data=x"]) == ""


def _prepare(tmp_path, argv, env, *, pci=(), hosts="", modules=None):
    build = tpu_runtime.TpuBuild("tensorflow-tpu 2.20.0", "/site/libtpu/libtpu.so", "wheel")
    return tpu_runtime.prepare(
        ["train", *argv],
        env,
        pci_root=_pci(tmp_path / "pci", *pci),
        metadata=lambda attribute: hosts if attribute == "worker-network-endpoints" else "",
        find_build=lambda: build,
        modules={} if modules is None else modules,
    )


V5E = [("0x1ae0", "0x0063")]
V3 = [("0x1ae0", "0x0027")] * 4


def test_v4_and_newer_get_pjrt_before_tensorflow_and_v2_v3_stream_executor(tmp_path):
    env: dict[str, str] = {}
    choice = _prepare(tmp_path / "a", ["--tpu=colab"], env, pci=V5E)
    assert env == {
        "NEXT_PLUGGABLE_DEVICE_USE_C_API": "true",
        "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": "/site/libtpu/libtpu.so",
    }
    assert choice.runtime == "pjrt" and choice.set_variables == env
    assert choice.describe().startswith("TPU v5e: PJRT runtime, tensorflow-tpu 2.20.0")
    env = {}
    choice = _prepare(tmp_path / "b", ["--tpu=local"], env, pci=V3)
    assert (choice.runtime, env) == ("se", {})
    assert "StreamExecutor" in choice.describe()
    # The user's own settings win; BONEAGE_TPU_RUNTIME overrides the generation's default.
    env = {"TF_PLUGGABLE_DEVICE_LIBRARY_PATH": "/mine.so"}
    _prepare(tmp_path / "c", ["--tpu=local"], env, pci=V5E)
    assert env["TF_PLUGGABLE_DEVICE_LIBRARY_PATH"] == "/mine.so"
    env = {"BONEAGE_TPU_RUNTIME": "pjrt"}
    assert _prepare(tmp_path / "d", ["--tpu=local"], env, pci=V3).runtime == "pjrt"
    with pytest.raises(tpu_runtime.TpuRuntimeError, match="BONEAGE_TPU_RUNTIME=xrt"):
        _prepare(tmp_path / "e", ["--tpu=local"], {"BONEAGE_TPU_RUNTIME": "xrt"}, pci=V5E)
    # No --tpu: nothing is touched, even on a TPU host.
    env = {}
    assert _prepare(tmp_path / "f", ["--data=x"], env, pci=V5E).runtime == "" and env == {}


def test_a_named_tpu_client_loads_no_libtpu(tmp_path):
    env: dict[str, str] = {}
    choice = _prepare(tmp_path / "a", ["--tpu=my-pod"], env, pci=V3)
    assert env == {"TPU_LOAD_LIBRARY": "0"} and choice.runtime == "client"
    env = {"COLAB_TPU_ADDR": "10.0.0.2:8470"}  # Colab's old TPU-node runtime
    _prepare(tmp_path / "b", ["--tpu=colab"], env)
    assert env["TPU_LOAD_LIBRARY"] == "0"


def test_local_on_a_multi_host_slice_and_pjrt_after_tensorflow_are_one_line_errors(tmp_path):
    with pytest.raises(tpu_runtime.TpuRuntimeError) as info:
        _prepare(tmp_path / "a", ["--tpu=local"], {}, pci=V3, hosts="10.0.0.1,10.0.0.2,10.0.0.3")
    message = str(info.value)
    assert (
        "\n" not in message
        and "3-host TPU slice" in message
        and "--tpu=<the TPU's name>" in message
    )
    # One host (a v5e-8, a v2-8): fine.
    assert _prepare(tmp_path / "b", ["--tpu=local"], {}, pci=V3, hosts="10.0.0.1").runtime == "se"
    with pytest.raises(tpu_runtime.TpuRuntimeError, match="TensorFlow was imported before"):
        _prepare(tmp_path / "c", ["--tpu=local"], {}, pci=V5E, modules={"tensorflow": object()})


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TPU_LOAD_LIBRARY")
    }
    environ.update(PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3", **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_entry_points_choose_the_runtime_before_tensorflow_is_imported(command):
    code = f"""
import os, sys
from boneage_tpu.core import tpu_runtime
from boneage_tpu.cli import {command} as entry
assert "tensorflow" not in sys.modules and "keras" not in sys.modules
real = tpu_runtime.prepare
def spy(argv, *args, **kwargs):
    choice = real(argv, *args, **kwargs)
    print("tensorflow loaded at prepare:", "tensorflow" in sys.modules)
    return choice
tpu_runtime.prepare = spy
sys.argv = ["{command}", "--tpu=some-node", "--help"]
try:
    entry.main(sys.argv)
except SystemExit:
    pass
print("TPU_LOAD_LIBRARY", os.environ.get("TPU_LOAD_LIBRARY"), "tensorflow", "tensorflow" in sys.modules)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tensorflow loaded at prepare: False" in done.stdout
    assert "TPU_LOAD_LIBRARY 0 tensorflow True" in done.stdout


@pytest.mark.slow
def test_keras_backend_is_tensorflow_or_a_one_line_error():
    done = _python("import boneage_tpu, keras; print(keras.backend.backend())")
    assert done.returncode == 0 and done.stdout.strip() == "tensorflow", done.stderr[-2000:]
    done = _python(
        "import sys; from boneage_tpu.cli import make_phantom as job; sys.exit(job.main(['make_phantom']))",
        KERAS_BACKEND="jax",
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "make_phantom: error: Keras runs on jax; boneage_tpu needs TensorFlow: unset "
        "KERAS_BACKEND or set KERAS_BACKEND=tensorflow"
    )
    assert cli.keras_backend() == "tensorflow"

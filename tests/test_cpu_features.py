"""Tests of the bfloat16 CPU detection on fake /proc/cpuinfo text."""

from __future__ import annotations

from boneage_tpu.core import cpu_features

_HEADER = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Fake CPU\n"


def _cpuinfo(flags: str, processors: int = 2) -> str:
    block = f"{_HEADER}flags\t\t: fpu vme sse2 avx2 {flags}\nbogomips\t: 4000.00\n\n"
    return block * processors


def test_avx512_bf16_and_amx_are_found():
    support = cpu_features.bf16_support(_cpuinfo("avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"))
    assert support == cpu_features.Bf16Support(avx512_bf16=True, amx=True)
    assert support.fast
    assert support.describe() == "CPU bf16: AVX-512 BF16 + AMX"


def test_avx512_bf16_alone_is_fast():
    support = cpu_features.bf16_support(_cpuinfo("avx512f avx512_bf16"))
    assert support.fast and not support.amx
    assert support.describe() == "CPU bf16: AVX-512 BF16"


def test_amx_needs_its_tiles():
    assert not cpu_features.bf16_support(_cpuinfo("amx_bf16")).fast
    assert cpu_features.bf16_support(_cpuinfo("amx_tile amx_bf16")).describe() == "CPU bf16: AMX"


def test_a_cpu_without_bf16_falls_back_with_a_reason():
    support = cpu_features.bf16_support(_cpuinfo("avx512f avx512bw avx512_vnni"))
    assert not support.fast and support.known
    assert "none" in support.describe() and "emulated" in support.describe()


def test_flag_names_must_match_whole_words():
    # avx512_bf16x is not avx512_bf16: the flags are a set of words, not a substring search.
    assert not cpu_features.bf16_support(_cpuinfo("avx512_bf16x amx_bf16_foo")).fast


def test_text_without_flags_is_unknown():
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16\nCPU implementer\t: 0x41\n"
    for text in ("", arm):
        support = cpu_features.bf16_support(text)
        assert not support.known and not support.fast
        assert "unknown" in support.describe()


def test_detect_reads_a_file_and_survives_a_missing_one(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(_cpuinfo("avx512_bf16"))
    assert cpu_features.detect(str(path)).avx512_bf16
    assert not cpu_features.detect(str(tmp_path / "missing")).known


def test_the_runtime_names_the_cpus_bf16_hardware_for_the_first_log_line() -> None:
    from boneage_tpu.core import distribute
    from boneage_tpu.core.config import RuntimeConfig

    fast = cpu_features.Bf16Support(avx512_bf16=True)
    settings = distribute.resolve_runtime(RuntimeConfig(), "cpu", cpu=fast)
    assert settings["cpu_hardware"] == "CPU bf16: AVX-512 BF16"
    assert settings["precision"] == "fp32"  # auto alone stays fp32 on CPU
    none = distribute.resolve_runtime(RuntimeConfig(), "cpu", cpu=cpu_features.Bf16Support())
    assert "bf16 would be emulated" in none["cpu_hardware"]
    assert distribute.resolve_runtime(RuntimeConfig(), "gpu")["cpu_hardware"] == ""


def test_cpu_bf16_switches_auto_to_bf16_only_where_the_cpu_computes_it(monkeypatch) -> None:
    from boneage_tpu.core import distribute
    from boneage_tpu.core.config import RuntimeConfig

    def precision(cpu: cpu_features.Bf16Support, **runtime) -> str:
        return distribute.resolve_runtime(RuntimeConfig(**runtime), "cpu", cpu=cpu)["precision"]

    avx, amx = cpu_features.Bf16Support(avx512_bf16=True), cpu_features.Bf16Support(amx=True)
    emulated, unknown = cpu_features.Bf16Support(), cpu_features.Bf16Support(known=False)
    assert precision(avx, cpu_bf16=True) == "bf16"
    assert precision(amx, cpu_bf16=True) == "bf16"
    assert precision(emulated, cpu_bf16=True) == "fp32"
    assert precision(unknown, cpu_bf16=True) == "fp32"
    # An explicit precision is what the user asked for, with or without the hardware.
    assert precision(avx, cpu_bf16=True, precision="fp32") == "fp32"
    assert precision(emulated, cpu_bf16=True, precision="bf16") == "bf16"
    # On a GPU the flag changes nothing: a T4-class GPU keeps fp16 with loss scaling.
    monkeypatch.setattr(distribute, "gpu_compute_capability", lambda: (7, 5))
    gpu = distribute.resolve_runtime(RuntimeConfig(cpu_bf16=True), "gpu", cpu=avx)
    assert gpu["precision"] == "fp16"

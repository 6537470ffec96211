"""The catalog build computes in bfloat16 only on CPUs that do it natively.

Emulated bfloat16 (a CPU without AMX or AVX-512 BF16, such as an AVX2-only
AMD EPYC) trains the fix-json adapter several times slower than float32.
"""

from __future__ import annotations

from pathlib import Path

from serve_apps.catalog.lora_train import cpu_flags, native_bf16


def test_native_bf16_needs_amx_or_avx512_bf16() -> None:
    assert native_bf16(frozenset({"avx2", "amx_bf16", "amx_tile"}))
    assert native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    assert not native_bf16(frozenset({"avx", "avx2", "fma", "avx512f"}))


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    cpu = "flags\t\t: fpu avx2 avx512_bf16\n"
    info.write_text(f"processor\t: 0\n{cpu}\nprocessor\t: 1\n{cpu}")
    assert cpu_flags(info) == frozenset({"fpu", "avx2", "avx512_bf16"})
    assert cpu_flags(tmp_path / "absent") == frozenset()

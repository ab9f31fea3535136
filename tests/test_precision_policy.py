"""Native bf16/fp16 on the CPU: detected from the instruction-set flags, named where they are
found (the dtype policy, the fp16 note of a run, %amp_check, the status), and `auto` unchanged:
bf16 where the CPU has native bf16, else fp32."""
import platform

import pytest
import torch
import torch.nn.functional as F

import amp_magics
from amp_magics import precision
from amp_magics.system import doctor, host
from amp_magics.views.status import _host_facts
from recipes import make_data, make_model

BASE_X86 = {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}  # f16c: fp16 conversions, no arithmetic
SAPPHIRE_PLUS = BASE_X86 | {"avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                            "amx_fp16"}


@pytest.fixture
def cpu(monkeypatch):
    """cpu(flags, system="Linux"): this process sees a CPU with these /proc/cpuinfo flags."""
    def fake(flags, system="Linux", sysctl=None):
        monkeypatch.setattr(host.platform, "system", lambda: system)
        monkeypatch.setattr(host, "_cpu_model_and_flags",
                            lambda: ("Fake CPU", None if flags is None else frozenset(flags)))
        monkeypatch.setattr(host, "_sysctl", lambda key: (sysctl or {}).get(key))
        host._precision_flags.cache_clear()

    yield fake
    host._precision_flags.cache_clear()


def fp16_run_notes():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                           optimizer=opt, data=make_data(n=3), dtype="fp16", progress=False)
    assert run.status == "finished" and run.precision == "fp16"
    return run.notes


def test_a_cpu_with_native_fp16_gets_no_emulation_note(cpu):
    cpu(BASE_X86 | {"avx512f", "avx512_fp16", "amx_tile", "amx_fp16", "amx_bf16"})
    assert host.cpu_precision_flags() == {"bf16": ("amx_bf16",),
                                          "fp16": ("amx_fp16", "avx512_fp16")}
    assert host.cpu_has_native_bf16() and host.cpu_has_native_fp16()
    auto = precision.resolve("auto", "cpu")
    assert (auto.name, auto.reason) == ("bf16", "CPU has native bf16 instructions (amx_bf16)")
    assert precision.cpu_fp16_note() is None
    assert not any("fp16" in note for note in fp16_run_notes())
    check = doctor._bf16(None)
    assert (check.status, check.detail) == (
        "pass", "this CPU has native bf16 instructions (amx_bf16); fp16 is native too "
                "(amx_fp16, avx512_fp16)")
    facts = dict(_host_facts(host.host_info()))
    assert facts["bf16"] == "native (amx_bf16)"
    assert facts["fp16"] == "native (amx_fp16, avx512_fp16)"


def test_both_bf16_flags_are_named(cpu):
    cpu(SAPPHIRE_PLUS)
    assert precision.auto_for_cpu().reason == ("CPU has native bf16 instructions "
                                               "(amx_bf16, avx512_bf16)")


def test_an_avx2_only_cpu_gets_the_note_and_fp32(cpu):
    cpu(BASE_X86)
    assert host.cpu_precision_flags() == {"bf16": (), "fp16": ()}
    auto = precision.resolve("auto", "cpu")
    assert (auto.name, auto.reason) == (
        "fp32", "CPU has no native bf16: emulated bf16 would be slower than fp32")
    note = ("fp16 autocast on this CPU is emulated and slow (no AVX512-FP16, AMX-FP16 or Arm FP16 "
            "instructions); fp32 is faster here")
    assert precision.cpu_fp16_note() == note
    assert note in fp16_run_notes()
    check = doctor._bf16(None)
    assert check.status == "warn" and check.detail == (
        "this CPU has no native bf16 (no avx512_bf16, amx_bf16 or Arm bf16 flag): bf16 autocast "
        "is emulated, slower than fp32; so is fp16")
    facts = dict(_host_facts(host.host_info()))
    assert facts["bf16"].startswith("not native") and facts["fp16"].startswith("not native")


def test_native_bf16_without_fp16_points_the_note_at_bf16(cpu):
    cpu(BASE_X86 | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})  # Sapphire Rapids sans FP16
    assert precision.cpu_fp16_note().endswith("; --dtype bf16 is native here (amx_bf16, "
                                              "avx512_bf16)")


def test_arm_half_precision_counts_only_with_simd(cpu):
    """FEAT_FP16 shows as fphp (scalar) and asimdhp (SIMD): autocast's kernels need asimdhp."""
    graviton2 = {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics",
                 "fphp", "asimdhp", "cpuid", "asimdrdm", "lrcpc", "dcpop", "asimddp"}
    cpu(graviton2)
    assert host.cpu_precision_flags() == {"bf16": (), "fp16": ("asimdhp",)}
    auto = precision.auto_for_cpu()
    assert auto.name == "fp32"  # fp16 needs a GradScaler: never picked by auto on a CPU
    assert auto.reason.endswith("; it has native fp16 (asimdhp): --dtype fp16 (with GradScaler) "
                                "may be faster")
    cpu(graviton2 | {"bf16", "svebf16", "i8mm"})  # Graviton3: Arm BF16
    assert host.cpu_precision_flags() == {"bf16": ("bf16",), "fp16": ("asimdhp",)}
    assert precision.auto_for_cpu().reason == "CPU has native bf16 instructions (bf16)"
    cpu({"fp", "asimd", "fphp"})  # scalar half precision alone
    assert host.cpu_precision_flags()["fp16"] == ()


def test_macos_reads_the_sysctl_features(cpu):
    cpu(None, system="Darwin", sysctl={"hw.optional.arm.FEAT_BF16": "0",
                                       "hw.optional.arm.FEAT_FP16": "1"})  # Apple M1
    assert host.cpu_precision_flags() == {"bf16": (), "fp16": ("FEAT_FP16",)}
    cpu(None, system="Darwin", sysctl={"hw.optional.arm.FEAT_BF16": "1",
                                       "hw.optional.arm.FEAT_FP16": "1"})  # M2 and later
    assert precision.auto_for_cpu().reason == "CPU has native bf16 instructions (FEAT_BF16)"
    cpu(None, system="Windows")
    assert host.cpu_precision_flags() == {"bf16": (), "fp16": ()}


def _proc_cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return None


@pytest.mark.skipif(platform.system() != "Linux" or _proc_cpuinfo_flags() is None,
                    reason="reads /proc/cpuinfo")
def test_this_machines_flags_agree_with_proc_cpuinfo():
    host._precision_flags.cache_clear()
    flags = _proc_cpuinfo_flags()
    found = host.cpu_precision_flags()
    assert found == {"bf16": tuple(sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})),
                     "fp16": tuple(sorted(flags & {"avx512_fp16", "amx_fp16", "asimdhp"}))}
    info = host.host_info()
    assert (info.bf16_flags, info.fp16_flags) == (found["bf16"], found["fp16"])
    assert (info.native_bf16, info.native_fp16) == (bool(found["bf16"]), bool(found["fp16"]))
    auto = precision.resolve("auto", "cpu")
    assert auto.name == ("bf16" if found["bf16"] else "fp32")
    assert all(flag in auto.reason for flag in found["bf16"] or found["fp16"])
    notes = fp16_run_notes()
    assert any("fp16 autocast on this CPU is emulated" in n for n in notes) == (not found["fp16"])

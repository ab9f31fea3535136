"""gpu.py, status_render.py and %gpu_status: the real no-GPU path, and GPUs through a fake NVML."""
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest
import readme_flags
from fake_nvml import GIB, MIB, FakeNvml, a100, h100, t4
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from amp_magics.system import gpu
from amp_magics.magics.gpu import GpuMagics
from amp_magics.precision import auto_for_cpu
from amp_magics.views.status import status_html, status_text

HOSTILE = "<img src=x onerror=alert(1)>"
ME = os.getpid()


@pytest.fixture
def nvml(monkeypatch):
    """Install a FakeNvml built from GPU records as the process's initialised NVML."""
    def install(gpus, **kwargs):
        fake = FakeNvml(gpus, **kwargs)
        monkeypatch.setattr(gpu, "_nvml_state", (fake, None))
        return fake
    return install


@pytest.fixture(autouse=True)
def no_watch_left_running():
    yield
    assert not [t for t in threading.enumerate() if t.name == "amp_magics-gpu-watch"]


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    shell.register_magics(GpuMagics(shell))
    return shell


def assert_fits_80_columns(text):
    assert max(len(line) for line in text.splitlines()) <= 80, text


# --- the real no-GPU path ------------------------------------------------------------------

def test_real_nvml_without_gpu_says_why_and_shows_the_host(monkeypatch):
    monkeypatch.setattr(gpu, "_nvml_state", None)  # initialise the real nvidia-ml-py afresh
    status = gpu.probe()
    if status.gpus:
        pytest.skip("this machine has an NVIDIA GPU")
    assert status.no_gpu_reason.startswith("NVML library not found")
    host = status.host
    assert host.cpu_model and host.logical_cpus >= 1
    assert host.ram_total > host.ram_available > 0 and host.process_rss > 0
    assert status.recommendation.device == "CPU"
    assert status.recommendation.dtype == auto_for_cpu().name
    text = status_text(status)
    assert text.startswith("No GPU: NVML library not found")
    assert "Recommendation: --dtype auto picks" in text
    assert_fits_80_columns(text)
    assert "NVML library not found" in status_html(status)
    json.dumps(status.to_dict())


def test_status_never_imports_torch():
    code = ("import sys; from amp_magics.system import gpu; "
            "from amp_magics.views import status as status_render; "
            "status_render.status_html(gpu.probe()); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("error, reason", [
    (pynvml.NVMLError_LibraryNotFound, "NVML library not found"),
    (pynvml.NVMLError_DriverNotLoaded, "NVIDIA driver not loaded"),
    (pynvml.NVMLError_NoPermission, "no permission to query the NVIDIA driver"),
    (pynvml.NVMLError_Unknown, "NVML failed to start: Unknown Error"),
])
def test_each_nvml_start_failure_has_its_own_reason(monkeypatch, error, reason):
    monkeypatch.setattr(gpu, "_nvml_state", None)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([a100()], init_error=error))
    status = gpu.probe()
    assert status.gpus == [] and status.no_gpu_reason.startswith(reason)


def test_nvml_is_initialised_once(monkeypatch):
    fake = FakeNvml([a100()])
    calls = []
    fake.nvmlInit = lambda: calls.append(1)
    monkeypatch.setattr(gpu, "_nvml_state", None)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpu.probe()
    gpu.probe()
    assert calls == [1]


# --- GPUs through the fake -----------------------------------------------------------------

def test_one_gpu_row_processes_and_advice(nvml):
    nvml([a100(compute=[(ME, 5 * GIB), (4242, 2 * GIB)], graphics=[(4242, 64 * MIB)])],
         process_names={ME: "python", 4242: "/usr/bin/python3"})
    status = gpu.probe()
    (g,) = status.gpus
    assert (g.index, g.name, g.capability) == (0, "NVIDIA A100-SXM4-80GB", (8, 0))
    assert g.precisions == ("fp16", "bf16", "tf32")
    assert (g.memory_used, g.memory_total, g.utilization, g.temperature) == (12 * GIB, 80 * GIB, 87, 54)
    assert (g.power_draw, g.power_limit, g.sm_clock, g.mig_enabled) == (250.123, 400.0, 1410, False)
    assert [(p.pid, p.kind, p.is_self) for p in g.processes] == [(ME, "C", True), (4242, "C+G", False)]
    assert (status.driver_version, status.cuda_driver_version) == ("550.54.15", "12.4")
    assert (status.recommendation.dtype, status.recommendation.device) == ("bf16", "GPU 0 (NVIDIA A100-SXM4-80GB)")
    text = status_text(status)
    assert_fits_80_columns(text)
    assert "cc 8.0  AMP: fp16 bf16 tf32" in text
    assert "12.0 / 80.0 GiB" in text and "250 / 400 W" in text and "MIG off" in text
    assert [line for line in text.splitlines() if "<- this kernel" in line] == [
        f"    {ME:>8}  C     5.0 GiB  python  <- this kernel"]
    html = status_html(status)
    assert "python <b>(this kernel)</b>" in html and 'title="15%"' in html


def test_eight_gpus_and_index_selection(nvml):
    nvml([h100(uuid=f"GPU-{i}") for i in range(8)])
    status = gpu.probe()
    assert [g.index for g in status.gpus] == list(range(8))
    assert all(g.precisions == ("fp16", "bf16", "tf32", "fp8") for g in status.gpus)
    assert_fits_80_columns(status_text(status))
    assert [g.index for g in gpu.probe([2, 0]).gpus] == [2, 0]
    with pytest.raises(ValueError, match="no GPU 8: this machine has 8"):
        gpu.probe([0, 8])


def test_mig_mode_and_unsupported_readings(nvml):
    nvml([a100(mig=[1, 1], utilization=pynvml.NVMLError_NotSupported),
          a100(mig=[0, 1]), t4(power=pynvml.NVMLError_NotSupported)])
    on, pending, turing = gpu.probe().gpus
    assert (on.mig_enabled, on.utilization) == (True, None)
    assert (pending.mig_enabled, pending.mig_pending) == (False, True)
    assert (turing.mig_enabled, turing.power_draw, turing.precisions) == (None, None, ("fp16",))
    text = status_text(gpu.probe())
    assert "util n/a" in text and "MIG on" in text and "MIG off (on after reset)" in text
    assert "power n/a" in text and "MIG n/a" in text


def test_recommendation_follows_the_first_gpu_shown(nvml):
    nvml([t4(), a100()])
    assert gpu.probe().recommendation.dtype == "fp16"
    assert gpu.probe([1]).recommendation.dtype == "bf16"


def test_failing_process_query_is_recorded_not_raised(nvml):
    nvml([a100(compute=pynvml.NVMLError_NoPermission, graphics=pynvml.NVMLError_NoPermission)])
    (g,) = gpu.probe().gpus
    assert g.processes == [] and g.process_error == "process query failed: Insufficient Permissions"
    assert "process query failed: Insufficient Permissions" in status_text(gpu.probe())


def test_process_query_falls_back_to_older_nvml(nvml):
    fake = nvml([a100(compute=[(4242, GIB)])])

    def missing(handle):
        raise pynvml.NVMLError_FunctionNotFound()

    fake.nvmlDeviceGetComputeRunningProcesses_v3 = missing
    fake.nvmlDeviceGetComputeRunningProcesses_v2 = lambda h: fake._processes(h, "compute")
    fake.nvmlDeviceGetGraphicsRunningProcesses_v3 = missing  # and no older graphics query at all
    (g,) = gpu.probe().gpus
    assert [p.pid for p in g.processes] == [4242]
    assert g.process_error == "process query failed: Function Not Found"


def test_hostile_process_and_gpu_names_are_escaped(nvml):
    nvml([a100(name=HOSTILE, compute=[(4242, GIB), (4243, GIB)])],
         process_names={4242: HOSTILE, 4243: "evil\x1b[2J"})
    status = gpu.probe()
    html = status_html(status)
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "\x1b" not in status_text(status) and "evil?[2J" in status_text(status)


def test_process_name_falls_back_to_proc_then_question_mark(nvml):
    nvml([a100(compute=[(ME, GIB), (2**22 + 12345, GIB)])])  # no names from NVML; pid 2**22+ is unused
    with open(f"/proc/{ME}/comm") as f:
        comm = f.read().strip()
    assert [p.name for p in gpu.probe().gpus[0].processes] == [comm, "?"]


def test_no_gpus_seen_by_a_loaded_driver(nvml):
    nvml([])
    assert gpu.probe().no_gpu_reason == "the NVIDIA driver is loaded but sees no GPU"


# --- this kernel's torch memory ------------------------------------------------------------

@pytest.fixture
def torch_holding_memory(monkeypatch):
    """torch.cuda answering as a kernel holding 4 GiB reserved on the GPU with the a100() UUID."""
    import torch

    props = SimpleNamespace(uuid="5b2f1a9e-3c4d-4e5f-8a9b-0c1d2e3f4a5b")
    for name, value in [("is_initialized", True), ("device_count", 1), ("memory_allocated", 3 * GIB),
                        ("memory_reserved", 4 * GIB), ("max_memory_allocated", 3 * GIB + GIB // 2),
                        ("get_device_properties", props)]:
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)


def test_torch_memory_gap_is_context_and_non_pytorch(nvml, torch_holding_memory):
    nvml([a100(compute=[(ME, 5 * GIB)])])
    status = gpu.probe()
    (mem,) = status.torch_memory
    assert (mem.device, mem.gpu_index, mem.allocated, mem.reserved) == ("cuda:0", 0, 3 * GIB, 4 * GIB)
    assert (mem.nvml_used, mem.other_memory) == (5 * GIB, GIB)
    assert mem.other_label == "CUDA context and non-PyTorch memory"
    text = status_text(status)
    assert "This kernel's PyTorch memory on cuda:0 (GPU 0):\n  allocated 3.0 GiB, reserved 4.0 GiB, peak 3.5 GiB" in text
    assert "+ 1.0 GiB CUDA context and non-PyTorch memory (NVML counts 5.0 GiB)" in text
    assert "CUDA context and non-PyTorch memory" in status_html(status)


def test_torch_memory_in_a_container_compares_with_the_whole_gpu(nvml, torch_holding_memory):
    nvml([a100(compute=[(987654, 5 * GIB)])])  # NVML reports a host PID that is not ours
    status = gpu.probe()
    (mem,) = status.torch_memory
    assert (mem.nvml_used, mem.other_memory) == (12 * GIB, 8 * GIB)
    assert mem.other_label == "CUDA context, non-PyTorch memory and other processes"
    assert any("container" in note and str(ME) in note for note in status.notes)


def test_torch_memory_of_a_gpu_not_shown_is_not_matched(nvml, torch_holding_memory):
    nvml([h100(uuid="GPU-other")])
    (mem,) = gpu.probe().torch_memory
    assert (mem.gpu_index, mem.other_memory) == (None, None)


# --- %gpu_status ---------------------------------------------------------------------------

def test_magic_returns_status_with_html(shell, nvml):
    nvml([a100()])
    status = shell.run_line_magic("gpu_status", "")
    assert isinstance(status, gpu.Status) and status.to_dict()["gpus"][0]["name"] == "NVIDIA A100-SXM4-80GB"
    assert status_html(status).startswith('<div class="amp-gpu-status"')


def test_magic_without_gpu_says_why(shell, monkeypatch):
    monkeypatch.setattr(gpu, "_nvml_state", None)  # the real nvidia-ml-py, started afresh
    status = shell.run_line_magic("gpu_status", "")
    if status.gpus:
        pytest.skip("this machine has an NVIDIA GPU")
    assert status.gpus == [] and status.torch_memory == []
    assert status.no_gpu_reason.startswith("NVML library not found")
    assert status.recommendation.device == "CPU"
    assert "NVML library not found" in status_html(status)


def test_magic_json_and_selection(shell, nvml, capsys):
    nvml([h100(uuid=f"GPU-{i}") for i in range(8)])
    assert shell.run_line_magic("gpu_status", "--json -i 0,2") is None
    data = json.loads(capsys.readouterr().out)
    assert [g["index"] for g in data["gpus"]] == [0, 2]
    assert data["recommendation"]["dtype"] == "bf16"


@pytest.mark.parametrize("line", ["--bogus", "-i x", "-i -1", "-i 9", "--watch abc", "--watch 0",
                                  "--watch 1 --json", "extra"])
def test_magic_bad_flags_are_usage_errors(shell, nvml, line):
    nvml([a100()])
    with pytest.raises(UsageError):
        shell.run_line_magic("gpu_status", line)


@pytest.mark.parametrize("name, at_least", [("gpu_status", 4), ("amp_check", 1)])
def test_every_flag_the_readme_documents_is_accepted(name, at_least):
    magic = getattr(GpuMagics, GpuMagics.magics["line"][name])
    readme_flags.assert_accepted(magic, name, at_least)


def test_readme_flag_values_reach_the_magic(shell, nvml, capsys):
    """`--watch` alone means every second; `-i 0,2` and `--index 0,2` select those GPUs."""
    from amp_magics.magics.args import parse

    assert parse(GpuMagics.gpu_status, "--watch").watch == 1.0
    assert parse(GpuMagics.gpu_status, "--watch 0.5").watch == 0.5
    nvml([h100(uuid=f"GPU-{i}") for i in range(4)])
    for line in ("--json -i 0,2", "--json --index 0,2"):
        shell.run_line_magic("gpu_status", line)
        assert [g["index"] for g in json.loads(capsys.readouterr().out)["gpus"]] == [0, 2]


def test_watch_refreshes_in_place_and_stops(shell, nvml):
    fake = nvml([a100(utilization=10)])
    watch = shell.run_line_magic("gpu_status", "--watch 0.05")
    try:
        assert watch.running and "10%" in watch.html.value
        fake.gpus[0]["utilization"] = 93
        deadline = time.monotonic() + 5
        while "93%" not in watch.html.value and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "93%" in watch.html.value
    finally:
        watch.stop()
    assert not watch.running and watch.button.disabled and watch.button.description == "Stopped"


def test_watch_stop_button(shell, nvml):
    nvml([a100()])
    watch = shell.run_line_magic("gpu_status", "--watch 0.05")
    try:
        watch.button.click()
    finally:
        watch.stop()  # idempotent; keeps a failing test from leaving the thread behind
    assert not watch.running

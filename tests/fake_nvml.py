"""A thin stand-in for the `pynvml` module (nvidia-ml-py) at the binding boundary.

It answers only the calls amp_magics.system.gpu makes, from per-GPU records with the values and units
NVML returns (bytes, mW, MHz; specification figures for these models). Errors are
nvidia-ml-py's own classes, so `except pynvml.NVMLError_...` behaves as against a real driver.
A record value that is an NVMLError class makes that query raise it.
"""
from types import SimpleNamespace

import pynvml

GIB = 1 << 30
MIB = 1 << 20


def a100(**changes) -> dict:
    record = dict(
        name="NVIDIA A100-SXM4-80GB", uuid="GPU-5b2f1a9e-3c4d-4e5f-8a9b-0c1d2e3f4a5b", capability=(8, 0),
        memory=(12 * GIB, 80 * GIB), utilization=87, temperature=54, power=250_123, power_limit=400_000,
        sm_clock=1410, mig=[0, 0], compute=[], graphics=[],
    )
    return {**record, **changes}


def h100(**changes) -> dict:
    return a100(**{"name": "NVIDIA H100 80GB HBM3", "capability": (9, 0), "power_limit": 700_000,
                   "sm_clock": 1980, **changes})


def t4(**changes) -> dict:
    # Turing: fp16 Tensor Cores only, and no MIG.
    return a100(**{"name": "Tesla T4", "capability": (7, 5), "memory": (1 * GIB, 15 * GIB),
                   "power_limit": 70_000, "sm_clock": 585, "mig": pynvml.NVMLError_NotSupported, **changes})


class FakeNvml:
    NVMLError = pynvml.NVMLError
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM

    def __init__(self, gpus, process_names=None, init_error=None):
        self.gpus = gpus
        self.process_names = process_names or {}  # pid -> name; others raise NVMLError_NotFound
        self.init_error = init_error

    def _get(self, handle, key):
        value = self.gpus[handle][key]
        if isinstance(value, type) and issubclass(value, pynvml.NVMLError):
            raise value()
        return value

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error()

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion_v2(self):
        return 12040

    def nvmlSystemGetProcessName(self, pid):
        if pid not in self.process_names:
            raise pynvml.NVMLError_NotFound()
        return self.process_names[pid]

    def nvmlDeviceGetName(self, h):
        return self._get(h, "name")

    def nvmlDeviceGetUUID(self, h):
        return self._get(h, "uuid")

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self._get(h, "capability")

    def nvmlDeviceGetMemoryInfo(self, h):
        used, total = self._get(h, "memory")
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._get(h, "utilization"), memory=0)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._get(h, "temperature")

    def nvmlDeviceGetPowerUsage(self, h):
        return self._get(h, "power")

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._get(h, "power_limit")

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self._get(h, "sm_clock")

    def nvmlDeviceGetMigMode(self, h):
        return self._get(h, "mig")

    def nvmlDeviceGetComputeRunningProcesses_v3(self, h):
        return self._processes(h, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, h):
        return self._processes(h, "graphics")

    def _processes(self, h, kind):
        # (pid, usedGpuMemory) pairs become the objects nvidia-ml-py returns.
        return [SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF,
                                computeInstanceId=0xFFFFFFFF) for pid, used in self._get(h, kind)]

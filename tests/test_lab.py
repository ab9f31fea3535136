"""The JupyterLab half: the server extension's status API, through a real Jupyter Server
(pytest-jupyter's fixtures, imported here so that they apply to this module only), and the
kernel's runs file it reads."""
import importlib.util
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

import amp_magics
from amp_magics.lab.runs_file import RunsFile, read_runs
from amp_magics.system import gpu
from fake_nvml import GIB, FakeNvml, a100, h100
from recipes import make_data, make_model

pytest.importorskip("pytest_jupyter")
from pytest_jupyter.jupyter_core import *  # noqa: E402,F401,F403  (fixtures of this module)
from pytest_jupyter.jupyter_server import *  # noqa: E402,F401,F403

ROUTE = ("api", "amp_magics", "v1", "status")


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"amp_magics.lab": True}}}


@pytest.fixture
def status(jp_fetch, jp_asyncio_loop):
    """GET the status, parsed."""
    def get():
        response = jp_asyncio_loop.run_until_complete(jp_fetch(*ROUTE))
        assert response.code == 200
        assert response.headers["Content-Type"].startswith("application/json")
        return json.loads(response.body)
    return get


def test_without_a_gpu_it_says_why_and_shows_the_host(status, monkeypatch):
    monkeypatch.setattr(gpu, "_nvml_state", (None, "NVML library not found: no NVIDIA driver"))
    answer = status()
    assert answer["version"] == 1 and answer["gpus"] == []
    assert answer["no_gpu_reason"].startswith("NVML library not found")
    host = answer["host"]
    assert host["logical_cpus"] >= 1 and host["ram_total"] > host["ram_available"] > 0
    assert answer["kernels"] == [] and '<div class="amp-gpu-status"' in answer["html"]
    assert "resident" not in answer["html"]  # the server's own memory means nothing there


def test_each_gpu_with_its_utilisation_memory_temperature_and_power(status, monkeypatch):
    monkeypatch.setattr(gpu, "_nvml_state", (FakeNvml([a100(memory=(12 * GIB, 80 * GIB), utilization=43),
                                                       h100()]), None))
    answer = status()
    assert [g["name"] for g in answer["gpus"]] == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    first = answer["gpus"][0]
    assert first["utilization"] == 43 and first["memory_used"] == 12 * GIB
    assert first["memory_total"] > first["memory_used"] and first["temperature"] is not None
    assert first["power_draw"] is not None and answer["no_gpu_reason"] is None
    assert set(first) == {"index", "name", "utilization", "memory_used", "memory_total",
                          "temperature", "power_draw", "power_limit"}


def test_the_status_bar_and_gpu_status_in_a_kernel_read_the_same_numbers(status, ip, capsys,
                                                                           monkeypatch):
    monkeypatch.setattr(gpu, "_nvml_state", (FakeNvml([a100(memory=(12 * GIB, 80 * GIB),
                                                            utilization=43), h100()]), None))
    host = gpu.host_info()  # the host's free RAM may change between the two probes
    monkeypatch.setattr(gpu, "host_info", lambda: host)
    served = status()
    ip.run("%gpu_status --json")
    kernel = json.loads(capsys.readouterr().out)
    keys = ("index", "name", "utilization", "memory_used", "memory_total", "temperature",
            "power_draw", "power_limit")
    assert [{k: g[k] for k in keys} for g in kernel["gpus"]] == served["gpus"]
    # the panel's table is %gpu_status's, less the facts of the probing process (the server)
    shown = ip.display_formatter.format(ip.run("%gpu_status"))[0]["text/html"]
    assert "this process" in shown and "this process" not in served["html"]

    def same(html):
        html = re.sub(r", this process [\d.]+ [KMG]?i?B", "", html)
        return re.sub(r"updated \d\d:\d\d:\d\d", "updated", html)
    assert same(shown) == same(served["html"])


def test_a_request_without_the_token_is_refused(jp_fetch, jp_asyncio_loop):
    import tornado.httpclient

    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        jp_asyncio_loop.run_until_complete(jp_fetch(*ROUTE, headers={"Authorization": ""}))
    assert refused.value.code == 403


def test_readings_are_cached_for_the_poll_interval(jp_serverapp, status, monkeypatch):
    calls = []
    cache = jp_serverapp.web_app.settings["amp_magics_status"]
    monkeypatch.setattr(cache, "probe", lambda: calls.append(1) or gpu.probe())
    monkeypatch.setattr(cache, "taken", -1e9)
    monkeypatch.setattr(cache, "ttl", 3600.0)  # a slow machine's two requests stay within it
    first, second = status(), status()
    assert calls == [1] and first["taken_at"] == second["taken_at"]


def test_the_runs_of_the_servers_kernels_only(jp_serverapp, status, jp_fetch, jp_asyncio_loop,
                                              tmp_path, monkeypatch):
    cache = jp_serverapp.web_app.settings["amp_magics_status"]
    monkeypatch.setattr(cache, "folder", lambda: str(tmp_path))
    kernel = json.loads(jp_asyncio_loop.run_until_complete(
        jp_fetch("api", "kernels", method="POST", body="{}")).body)
    try:
        for kernel_id in (kernel["id"], "a-kernel-that-is-gone"):
            (tmp_path / f"kernel-{kernel_id}.json").write_text(json.dumps(
                {"kernel_id": kernel_id, "runs": [{"name": "run1", "status": "running",
                                                   "step": 7, "loss": 0.5}]}))
        (tmp_path / ".amp_runs_half_written.json").write_text("{")
        answer = status()
        assert answer["kernels"] == [{"id": kernel["id"], "runs": [
            {"name": "run1", "status": "running", "step": 7, "loss": 0.5}]}]
    finally:
        jp_asyncio_loop.run_until_complete(
            jp_fetch("api", "kernels", kernel["id"], method="DELETE"))


def test_a_kernel_writes_its_runs_as_they_train(tmp_path):
    model = make_model()
    writer = RunsFile("abc", str(tmp_path))
    amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data=make_data(n=5),
                     dtype="fp32", name="written", observers=[writer])
    (runs,) = read_runs(str(tmp_path), {"abc"}).values()
    mine = next(r for r in runs if r["name"] == "written")
    assert mine["status"] == "finished" and mine["step"] == 5 and mine["total_steps"] == 5
    assert isinstance(mine["loss"], float) and mine["precision"] == "fp32"
    assert os.listdir(tmp_path) == ["kernel-abc.json"]  # written atomically, nothing left over
    assert read_runs(str(tmp_path), {"someone-else"}) == {}


def test_runs_started_from_python_in_the_kernel_are_written_too(tmp_path):
    """The extension, loaded in a kernel, adds its runs file to every run the notebook starts:
    amp_magics.train() and a search's trials as well as %%amp_train."""
    from amp_magics.training import registry

    model = make_model()
    registry.set_kernel_views([RunsFile("k1", str(tmp_path))])
    try:
        step = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        amp_magics.train(step, model=model, optimizer=optimizer, data=make_data(n=3),
                         dtype="fp32", name="from-python", progress=False)
        if importlib.util.find_spec("optuna"):
            amp_magics.search(step, model=model, optimizer=optimizer, data=make_data(n=3),
                              dtype="fp32", epochs=1, space={"lr": 0.05}, trials=1,
                              name="searched", progress=False)
    finally:
        registry.set_kernel_views([])
    (runs,) = read_runs(str(tmp_path), {"k1"}).values()
    ended = {(r["name"], r["status"], r["step"]) for r in runs}
    assert ("from-python", "finished", 3) in ended
    assert not importlib.util.find_spec("optuna") or \
        ("searched[lr=0.05]", "finished", 3) in ended, ended


def test_a_diverged_run_is_written_as_strict_json(tmp_path):
    # A browser's JSON.parse refuses NaN: a diverged run's loss travels as the string "nan".
    model = make_model()
    data = make_data(n=3)
    data[1] = (data[1][0] * float("nan"), data[1][1])
    amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data=data,
                     dtype="fp32", name="diverged", observers=[RunsFile("abc", str(tmp_path))])

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    written = json.loads((tmp_path / "kernel-abc.json").read_text(), parse_constant=refuse)
    (diverged,) = [r for r in written["runs"] if r["name"] == "diverged"]
    assert diverged["loss"] == "nan" and diverged["step"] == 3


def test_the_server_extension_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, amp_magics.lab.handlers, amp_magics.lab.status; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)

"""doctor.py and %amp_check on this machine: a CPU-only torch build, no NVIDIA driver; and
what %%amp_doctor / --diagnose blame when the precision is not the cause."""
import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import amp_magics
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from amp_magics.diagnostics.overflow import locate_nonfinite
from amp_magics.errors import AmpUsageError
from amp_magics.system import doctor, environment
from amp_magics.magics.gpu import GpuMagics
from amp_magics.views.status import checks_html, checks_text

REQUIRED = ["Python", "torch", "CUDA available", "cuDNN", "GPU", "Tensor Cores", "bf16", "driver / CUDA",
            "AMP smoke test", "torch companions", "nvidia-ml-py", "deprecated pynvml", "ipywidgets", "conda"]


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    shell.register_magics(GpuMagics(shell))
    return shell


@pytest.fixture(scope="module")
def report(shell):
    return shell.run_line_magic("amp_check", "")


def by_name(report, name):
    return next(c for c in report.checks if c.name == name)


def test_amp_check_runs_every_check(report):
    assert [c.name for c in report.checks] == REQUIRED
    assert all(c.status in ("pass", "warn", "fail", "info") for c in report.checks)
    assert all(c.fix for c in report.checks if c.status in ("warn", "fail"))


def test_cpu_smoke_test_really_trains_in_bf16(report):
    smoke = by_name(report, "AMP smoke test")
    assert smoke.status == "pass", smoke
    loss_before, loss_after = map(float, re.findall(r"\d+\.\d+", smoke.detail))
    assert smoke.detail.startswith("2 steps of bf16 autocast on cpu") and loss_after < loss_before


def test_this_cpu_only_machine_is_reported_as_such(report):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert by_name(report, "torch").detail.endswith("(CPU-only build)")
    cuda = by_name(report, "CUDA available")
    assert cuda.status == "warn" and "NVML library not found" in cuda.detail
    assert by_name(report, "nvidia-ml-py").status == "pass"
    assert by_name(report, "deprecated pynvml").status == "pass"
    assert by_name(report, "ipywidgets").status == "pass"
    assert by_name(report, "torch companions").status in ("pass", "info")
    assert report.ok


def test_smoke_test_leaves_the_random_state_alone():
    state = torch.random.get_rng_state()
    doctor.amp_smoke_test(torch)
    assert torch.equal(state, torch.random.get_rng_state())


def test_smoke_test_failure_is_a_finding(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(torch, "autocast", broken)
    check = doctor.amp_smoke_test(torch)
    assert check.status == "fail" and "no kernel image is available" in check.detail and check.fix


def test_report_renders_in_80_columns_and_escapes_html(report):
    text = checks_text(report.checks)
    assert max(map(len, text.splitlines())) <= 80
    hostile = [doctor.Check("GPU", "fail", "<img src=x onerror=alert(1)>", "<script>")]
    html = checks_html(hostile)
    assert "<img" not in html and "<script>" not in html and "&lt;img" in html
    assert checks_html(report.checks).startswith('<div class="amp-check"')


def test_deprecated_pynvml_is_found_by_its_distribution(monkeypatch):
    versions = {"pynvml": "11.5.0"}
    monkeypatch.setattr(doctor, "_distribution_version", versions.get)
    check = doctor._no_deprecated_pynvml()
    assert check.status == "warn" and "pynvml 11.5.0" in check.detail and "pip uninstall" in check.fix


def test_conda_environment(monkeypatch):
    monkeypatch.setenv("CONDA_DEFAULT_ENV", "amp")
    monkeypatch.setenv("CONDA_PREFIX", sys.prefix)
    check = doctor._conda()
    assert check.status == "info" and "'amp'" in check.detail and sys.prefix in check.detail
    monkeypatch.setenv("CONDA_PREFIX", "/opt/conda/envs/other")
    check = doctor._conda()
    assert check.status == "warn" and "ipykernel install" in check.fix
    monkeypatch.delenv("CONDA_PREFIX")
    assert "not in a conda environment" in doctor._conda().detail


@pytest.mark.parametrize("capability, generation", [
    ((6, 1), None), ((7, 0), "Volta"), ((7, 5), "Turing"), ((8, 0), "Ampere"), ((8, 6), "Ampere"),
    ((8, 9), "Ada Lovelace"), ((9, 0), "Hopper"), ((12, 0), "Blackwell"),
])
def test_tensor_core_generations(capability, generation):
    found = doctor.tensor_core_generation(*capability)
    assert (found is None) if generation is None else generation in found


def test_gpu_side_checks_from_capability():
    assert doctor._tensor_cores((9, 0)).detail.endswith("fp16, bf16, tf32, fp8")
    assert doctor._tensor_cores((6, 1)).status == "warn"
    assert doctor._bf16((8, 0)).status == "pass"
    assert doctor._bf16((7, 5)).status == "warn" and "fp16" in doctor._bf16((7, 5)).fix
    assert (doctor._cudnn_version(8902), doctor._cudnn_version(90100)) == ("8.9.2", "9.1.0")


@pytest.mark.parametrize("driver_cuda, runtime, status", [
    ("12.4", "12.4", "pass"), ("12.6", "12.1", "pass"), ("12.2", "12.4", "warn"), ("11.8", "12.4", "fail"),
])
def test_driver_against_torch_cuda_runtime(driver_cuda, runtime, status):
    probe = SimpleNamespace(driver_version="550.54.15", cuda_driver_version=driver_cuda, no_gpu_reason=None)
    built_for = SimpleNamespace(version=SimpleNamespace(cuda=runtime))
    check = doctor._driver(built_for, probe)
    assert check.status == status and f"supports CUDA up to {driver_cuda}" in check.detail


def test_cpu_torch_on_a_gpu_machine_fails_with_a_fix():
    probe = SimpleNamespace(gpus=[object()], cuda_driver_version="12.4", no_gpu_reason=None)
    cpu_build = SimpleNamespace(__version__="2.5.1+cpu", version=SimpleNamespace(cuda=None, hip=None))
    check = doctor._torch_build(cpu_build, probe)
    assert check.status == "fail" and "CUDA 12.4 or older" in check.fix


def test_export_writes_a_conda_environment(shell, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONDA_DEFAULT_ENV", "base")  # `conda env create` refuses that name
    path = tmp_path / "environment.yml"
    report = shell.run_line_magic("amp_check", f"--export {path}")
    assert isinstance(report, doctor.Report) and f"Wrote {path}" in capsys.readouterr().out
    doc = yaml_doc(path.read_text())
    assert doc["name"] == "amp-magics"
    assert doc["channels"] == ["pytorch", "conda-forge", "defaults"]
    python, pip, nested = doc["dependencies"]
    assert python == f"python={sys.version_info.major}.{sys.version_info.minor}" and pip == "pip"
    pins = nested["pip"]
    assert f"torch=={torch.__version__}" in pins
    assert any(p.startswith("nvidia-ml-py==") for p in pins) and any(p.startswith("amp_magics==") for p in pins)
    if "+" in torch.__version__:
        local = torch.__version__.split("+")[1]
        assert pins.index(f"--extra-index-url https://download.pytorch.org/whl/{local}") < pins.index(
            f"torch=={torch.__version__}")


def test_amp_check_bad_flags(shell, tmp_path):
    with pytest.raises(UsageError):
        shell.run_line_magic("amp_check", "--bogus")
    with pytest.raises(UsageError, match="cannot write"):
        shell.run_line_magic("amp_check", f"--export {tmp_path}/missing/dir/environment.yml")



def test_export_is_valid_yaml_and_round_trips(tmp_path):
    import yaml

    path = tmp_path / "environment.yml"
    environment.export_environment(path)
    text = path.read_text()
    env = yaml.safe_load(text)
    # written by the YAML library: loading and writing again gives the same document
    assert yaml.safe_load(yaml.safe_dump(env, sort_keys=False)) == env
    assert text.split("\n", 2)[2].lstrip("#").strip() and "name:" in text
    assert env["name"] and env["channels"] == ["pytorch", "conda-forge", "defaults"]
    assert env["dependencies"][:2] == [f"python={sys.version_info.major}.{sys.version_info.minor}", "pip"]
    assert f"torch=={torch.__version__}" in env["dependencies"][2]["pip"]


def pip_pins(text):
    return yaml_doc(text)["dependencies"][-1]["pip"]


def yaml_doc(text):
    import yaml

    return yaml.safe_load(text)


def test_export_pins_every_installed_distribution():
    import importlib.metadata

    pins = pip_pins(environment.environment_yml())
    for dist in ("pytest", "PyYAML", "ipykernel", "transformers", "hypothesis"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert f"{dist}=={version}" in pins
    names = [p.split("==")[0].lower() for p in pins if "==" in p]
    assert names == sorted(names, key=lambda n: n.replace("_", "-")) and len(names) == len(set(names))
    assert not {"pip", "setuptools", "wheel"} & set(names)
    assert sum(1 for p in pins if p.startswith("torch==")) == 1


def test_export_pins_torch_with_its_build_index():
    pins = pip_pins(environment.environment_yml())
    public, _, local = torch.__version__.partition("+")
    indexes = [p for p in pins if p.startswith("--")]
    if local:
        # pip takes torch==2.13.0+cpu only from PyTorch's index, hence the index line
        assert indexes == [f"--extra-index-url https://download.pytorch.org/whl/{local}"]
        assert f"torch=={public}+{local}" in pins
    else:
        assert indexes == [] and f"torch=={public}" in pins


def test_export_marks_amp_magics_from_a_clone():
    text = environment.environment_yml()
    pin = next(p for p in pip_pins(text) if p.startswith("amp_magics=="))
    assert pin == f"amp_magics=={amp_magics.__version__}"
    assert "# amp_magics runs from a clone here: to rebuild from the clone, `pip install -e .`" in text


def test_export_pins_local_builds_and_says_how(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "localpkg-1.2+g1234.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: localpkg\nVersion: 1.2+g1234\n")
    (info / "direct_url.json").write_text('{"url": "file:///src/localpkg", "dir_info": {"editable": true}}')
    vcs = site / "fromgit-0.3.dist-info"
    vcs.mkdir()
    (vcs / "METADATA").write_text("Metadata-Version: 2.1\nName: fromgit\nVersion: 0.3\n")
    (vcs / "direct_url.json").write_text('{"url": "https://github.com/o/fromgit.git", '
                                         '"vcs_info": {"vcs": "git", "commit_id": "abc123"}}')
    monkeypatch.syspath_prepend(str(site))
    text = environment.environment_yml()
    pins = pip_pins(text)
    assert "localpkg==1.2" in pins and "fromgit @ git+https://github.com/o/fromgit.git@abc123" in pins
    assert "# localpkg is installed editable from a local directory here" in text
    assert "# localpkg 1.2+g1234 is a local build: the pin drops its local tag (+g1234)" in text


def test_export_in_a_conda_environment_splits_conda_and_pip(tmp_path, monkeypatch):
    import importlib.metadata

    prefix = tmp_path / "envs" / "train"
    meta = prefix / "conda-meta"
    meta.mkdir(parents=True)
    numpy = importlib.metadata.version("numpy")
    records = {
        "python": {"version": "3.11.7", "build": "hab00c5b_0", "channel": "https://conda.anaconda.org/conda-forge/linux-64"},
        "pip": {"version": "24.0", "build": "pyhd8ed1ab_0", "channel": "https://conda.anaconda.org/conda-forge/noarch"},
        "numpy": {"version": numpy, "build": "py311h_0", "channel": "https://repo.anaconda.com/pkgs/main/linux-64",
                  "files": [f"lib/python3.11/site-packages/numpy-{numpy}.dist-info/METADATA"]},
        "pytorch": {"version": "2.5.1", "build": "py3.11_cuda12.4_cudnn9.1.0_0", "schannel": "pytorch"},
        "pytorch-cuda": {"version": "12.4", "build": "hc786d27_7", "channel": "https://conda.anaconda.org/nvidia/noarch"},
        "pyyaml": {"version": "6.0", "build": "pypi_0", "channel": "pypi"},  # pip's, as conda lists it
    }
    for name, record in records.items():
        (meta / f"{name}-{record['version']}-{record['build']}.json").write_text(json.dumps({"name": name, **record}))
    monkeypatch.setattr(sys, "prefix", str(prefix))  # a kernel started without `conda activate`
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.delenv("CONDA_DEFAULT_ENV", raising=False)

    text = environment.environment_yml()
    env = yaml_doc(text)
    assert env["name"] == "train"
    assert env["channels"] == ["pytorch", "nvidia", "conda-forge", "defaults"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert conda == [f"numpy={numpy}=py311h_0", "pip=24.0=pyhd8ed1ab_0", "python=3.11.7=hab00c5b_0",
                     "pytorch=2.5.1=py3.11_cuda12.4_cudnn9.1.0_0", "pytorch-cuda=12.4=hc786d27_7"]
    pins = env["dependencies"][-1]["pip"]
    assert not any(p.lower().startswith(("numpy==", "torch==", "--extra-index-url")) for p in pins)
    assert any(p.startswith("PyYAML==") for p in pins) and any(p.startswith("pytest==") for p in pins)
    assert "(5 conda packages," in text.splitlines()[0]


# -- %%amp_doctor and --diagnose: causes no precision fixes ------------------------------------
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def labelled_batches(n=2):
    torch.manual_seed(1)
    return [(torch.randn(8, 8), torch.randint(0, 3, (8,))) for _ in range(n)]


def test_diagnose_after_a_diverged_run_blames_the_weights_not_fp16():
    net, data = mlp(), labelled_batches()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # a bf16 run whose loss goes NaN steps on (no scaler to skip it): every weight is NaN
    amp_magics.train(lambda b: F.cross_entropy(net(b[0]), b[1]) * float("nan"), model=net,
                     optimizer=opt, data=data, dtype="bf16", steps=1, progress=False)
    run = amp_magics.train(lambda b: F.cross_entropy(net(b[0]), b[1]), model=net, optimizer=opt,
                           data=data, dtype="fp16", steps=1, diagnose=True, progress=False)
    d = run.diagnosis
    assert d.forward.module == "0" and d.forward.problem == "NaN"
    assert d.advice == ("`0.weight` holds NaN, `0.bias` holds NaN, `2.weight` holds NaN (and 1 "
                        "more): the weights are already broken (a diverged earlier run?), and no "
                        "precision will fix this: reload them from a checkpoint or re-initialise "
                        "them.")
    assert any(n.endswith(d.advice) for n in run.notes)


def test_a_nan_weight_or_statistic_is_named_and_a_masks_minus_inf_is_not():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                              torch.nn.Linear(16, 3))
    net.register_buffer("mask", torch.tensor([0.0, float("-inf")]))  # meant: not broken
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
        net[1].running_var[3] = float("nan")
    d = locate_nonfinite(lambda b: F.cross_entropy(net(b[0]), b[1]), net, labelled_batches()[0],
                         "fp16")
    assert d.advice.startswith("`0.weight` holds NaN, `1.running_var` holds NaN: the weights "
                               "are already broken")
    assert "bf16" not in d.advice and "overflow" not in d.advice
    assert "weights         `0.weight` holds NaN, `1.running_var` holds NaN" in repr(d)
    assert d.nonfinite_weights == [("0.weight", "NaN"), ("1.running_var", "NaN")]


class Sqrt(torch.nn.Module):
    def forward(self, x):
        return x.sqrt()  # NaN for x < 0, whatever the precision


def test_nan_within_fp16_range_is_not_called_an_overflow():
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), Sqrt())
    torch.nn.init.ones_(net[0].weight)
    torch.nn.init.zeros_(net[0].bias)
    x = torch.ones(2, 8)
    x[1] = -1  # outputs 8 and -8: sqrt gives 2.83 and NaN
    step = lambda b: net(b[0]).sum()  # noqa: E731
    d = locate_nonfinite(step, net, (x,), "fp16", scale=1)
    assert (d.forward.module, d.forward.problem) == ("1", "NaN")
    assert "overflows" not in d.advice and "nothing here shows an overflow" in d.advice
    assert "run %%amp_doctor on this batch with --dtype fp32" in d.advice
    # what the advice says to try: fp32 finds the same NaN, a numerical problem
    fp32 = locate_nonfinite(step, net, (x,), "fp32")
    assert "this is a numerical problem, not a precision one" in fp32.advice
    # NaN from an input beyond fp16's max (1e5 becomes inf, then inf - inf) is an overflow
    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(net.weight, 1.0)
    net.weight.data[0, 1] = -1.0
    d = locate_nonfinite(lambda b: net(b[0]).sum(), net, (torch.full((1, 2), 1e5),), "fp16",
                         scale=1)
    assert d.forward.problem == "NaN" and "`(model)` (Linear) overflows fp16" in d.advice


def test_inf_made_between_modules_is_not_blamed_on_the_batch():
    net, (batch,) = mlp(), labelled_batches(1)
    d = locate_nonfinite(lambda b: F.cross_entropy(net[2](net[1](net[0](b[0]) * 1e10)), b[1]),
                         net, batch, "fp16")
    assert d.forward.module == "1" and d.forward.inputs_nonfinite
    assert "not the cause" not in d.advice
    assert "but the batch is finite: code outside the modules made it" in d.advice
    assert "Under fp16 autocast that may be an overflow" in d.advice
    assert "no float input" not in repr(d) and "the input already had inf/NaN" in repr(d)


def test_nan_targets_are_blamed_on_the_batch():
    net = torch.nn.Linear(8, 1)
    y = torch.zeros(4, 1)
    y[2] = float("nan")
    d = locate_nonfinite(lambda b: F.mse_loss(net(b[0]), b[1]), net, (torch.ones(4, 8), y),
                         "fp16")
    assert d.forward is None and d.backward is not None  # the NaN loss's gradients
    assert d.advice == ("No module output is inf/NaN, but the loss is, and the batch holds "
                        "inf/NaN (the targets?), so fp16 is not the cause: check the batch.")


def test_a_lazy_model_not_yet_shaped_is_refused_clearly():
    net = torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    batch = labelled_batches(1)[0]
    step = lambda b: F.cross_entropy(net(b[0]), b[1])  # noqa: E731
    with pytest.raises(AmpUsageError, match="lazy parameters that no forward has shaped yet"):
        locate_nonfinite(step, net, batch, "fp16")
    net(batch[0])  # shaped: diagnosed as any model
    assert locate_nonfinite(step, net, batch, "fp16").forward is None

"""%amp_check's "torch companions" check: torchvision, torchaudio and every package built on
torch must import next to this torch. Broken companions are stub packages on PYTHONPATH."""
import sys
import textwrap

import pytest
import torch

from amp_magics.system import companions, doctor

CHECK = "torch companions"
NMS = "operator torchvision::nms does not exist"


def stub(root, name, version, source="", requires=("torch",), top_level=True, record=False):
    """An installed distribution `name` in `root`: a package whose __init__.py runs `source`."""
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-{version}.dist-info"
    info.mkdir()
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    (info / "METADATA").write_text(metadata)
    if top_level:
        (info / "top_level.txt").write_text(f"{name}\n")
    if record:
        (info / "RECORD").write_text(f"{name}/__init__.py,,\n{info.name}/METADATA,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on this process's sys.path and on PYTHONPATH, as a user's extra site is."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", str(root))
    real = doctor.find_companions

    def only_the_stubs():  # what this environment has installed (Lightning...) is not checked
        names = {info.name.split("-")[0] for info in root.glob("*.dist-info")}
        return [c for c in real() if c.name in names]
    monkeypatch.setattr(doctor, "find_companions", only_the_stubs)
    return root


def by_name(report, name):
    return next(c for c in report.checks if c.name == name)


def test_a_companion_that_cannot_import_fails_amp_check(site):
    stub(site, "torchvision", "0.99.0", f'raise RuntimeError("{NMS}")')

    report = doctor.run_checks()

    check = by_name(report, CHECK)
    assert check.status == "fail" and not report.ok
    assert check.detail == (f"torchvision 0.99.0 fails to import with torch {torch.__version__}: "
                            f"RuntimeError: {NMS}")
    assert "pip install --force-reinstall --no-deps torchvision==" in check.fix
    if "+" in torch.__version__:
        local = torch.__version__.split("+")[1]
        assert f"--index-url https://download.pytorch.org/whl/{local}" in check.fix
    assert "torchvision" not in sys.modules  # imported in a subprocess, never here


def test_a_cuda_companion_next_to_a_cpu_torch_is_named_as_such(site):
    stub(site, "torchvision", "0.20.1+cu121", f'raise RuntimeError("{NMS}")')
    check = doctor.torch_companions("2.5.1+cpu")
    assert check.status == "fail"
    assert check.detail.endswith(f"RuntimeError: {NMS} (a cu121 build of torchvision next to a cpu "
                                 "build of torch)")
    assert check.fix == ("pip install --force-reinstall --no-deps torchvision==0.20.1 --index-url "
                         "https://download.pytorch.org/whl/cpu (the torchvision built for torch 2.5.1+cpu)")


def test_healthy_companions_pass_and_extras_do_not_count(site):
    stub(site, "torchgood", "1.0", "import torch\nassert torch.ones(1).item() == 1\n", requires=["torch>=2"])
    stub(site, "optionaltorch", "2.0", "raise ImportError('never imported')",
         requires=['torch>=2; extra == "torch"'])
    stub(site, "torchaudio", "9.9.9", "", requires=(), top_level=False, record=True)  # found by name

    names = [c.name for c in companions.find_companions()]
    assert "torchgood" in names and "torchaudio" in names and "optionaltorch" not in names
    check = doctor.torch_companions(torch.__version__)
    assert check.status == "pass", check
    assert "torchaudio 9.9.9" in check.detail and "torchgood 1.0" in check.detail
    assert check.detail.endswith(f"import with torch {torch.__version__}")


def test_the_companions_really_installed_here_import():
    check = doctor.torch_companions(torch.__version__)
    if check.status == "info":
        assert check.detail.startswith("none installed")
    else:
        assert check.status == "pass", check


def test_a_crash_is_a_failure_and_later_companions_are_not_reported_as_fine(site):
    stub(site, "torchcrash", "1.0", "import os\nos._exit(3)\n")
    stub(site, "torchlater", "1.0", "")
    check = doctor.torch_companions("2.5.1+cu121")
    assert check.status == "fail"
    assert "torchcrash 1.0 fails to import with torch 2.5.1+cu121: importing torchcrash ended Python " \
           "with exit code 3" in check.detail
    assert "not reached, so not checked: torchlater" in check.detail
    assert "reinstall torchcrash for torch 2.5.1+cu121" in check.fix


def test_a_hanging_import_is_a_warning_not_a_hung_notebook(site):
    stub(site, "torchslow", "1.0", "import time\ntime.sleep(60)\n")
    check = doctor.torch_companions(torch.__version__, timeout=3)
    assert check.status == "warn"
    assert check.detail == "importing torchslow did not finish within 3 s"
    assert "import torchslow in a fresh Python" in check.fix


def test_what_imported_packages_print_is_ignored(site):
    stub(site, "torchchatty", "1.0", "print('{\"module\": \"x\"}')\nprint('hello')\n")
    assert doctor.torch_companions(torch.__version__).status == "pass"


@pytest.mark.parametrize("torch_version, torchvision, torchaudio", [
    ("2.0.0", "0.15.1", "2.0.1"), ("2.0.1", "0.15.2", "2.0.2"), ("2.1.2", "0.16.2", "2.1.2"),
    ("2.3.1", "0.18.1", "2.3.1"), ("2.4.0", "0.19.0", "2.4.0"), ("2.5.1+cu124", "0.20.1", "2.5.1"),
    ("2.6.0", "0.21.0", "2.6.0"), ("2.7.1", "0.22.1", "2.7.1"), ("2.8.0", "0.23.0", "2.8.0"),
    ("1.13.1", None, None),
])
def test_matching_companion_versions(torch_version, torchvision, torchaudio):
    assert companions.matching_companion_version("torchvision", torch_version) == torchvision
    assert companions.matching_companion_version("torchaudio", torch_version) == torchaudio


@pytest.mark.parametrize("torch_version, expected", [
    ("2.5.1", "pip install --force-reinstall --no-deps torchvision==0.20.1 (the torchvision built for "
              "torch 2.5.1)"),
    ("2.4.0+cu121", "torchvision==0.19.0 --index-url https://download.pytorch.org/whl/cu121 "),
    ("2.5.1+rocm6.2", "--index-url https://download.pytorch.org/whl/rocm6.2 "),
    ("2.13.0+cpu", "torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cpu (0.28.0 is the "
                   "torchvision release matching torch 2.13.0 by PyTorch's numbering"),
    ("2.3.0a0+6ddf5cf85e", "is not a PyPI or download.pytorch.org build: build torchvision from source"),
    ("1.13.1+cpu", "install the torchvision release that matches torch 1.13.1+cpu"),
])
def test_companion_fix(torch_version, expected):
    assert expected in companions.companion_fix(companions.Companion("torchvision", "0.1", ["torchvision"]),
                                            torch_version)

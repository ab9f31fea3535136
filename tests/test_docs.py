"""The README and environment.yml keep the promises the package makes."""
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda package name -> PyPI name


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {CONDA_NAMES.get(_name(d), _name(d)) for d in env["dependencies"]
             if isinstance(d, str)} - {"python", "pip"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert conda == {_name(d) for d in project["dependencies"]}
    pip_part = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_part


def test_readme_starts_with_the_two_fresh_machine_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in lines[:20] if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    assert "torch==2.13.0" in commands[0] and "demo_notebooks/01_quickstart.ipynb" in commands[0]
    assert commands[1].endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci and "torch==2.13.0" in ci


def test_every_flag_of_every_magic_is_in_the_readme(ip):
    readme = (ROOT / "README.md").read_text()
    magics = ip.magics_manager.magics
    ours = {name: fn for kind in ("line", "cell") for name, fn in magics[kind].items()
            if getattr(fn, "__module__", "").startswith("amp_magics")}
    assert {"amp_train", "amp_stop", "gpu_status", "amp_check"} <= ours.keys()
    for name, fn in ours.items():
        assert f"%{name}" in readme, name
        parser = getattr(fn, "parser", None)
        for action in parser._actions if parser else ():
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in readme or f" {flag}" in readme, f"%{name} {flag}"

"""Packages built on torch (torchvision, torchaudio, anything that requires torch) must import
next to the installed torch: a CUDA torchvision beside a CPU torch passes every other check
and fails on `import`. They are imported in one fresh Python, never in the kernel.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .environment import (BUILD_TAG, GET_TORCH, PYTORCH_INDEX, installed_distributions,
                          normalize)

if TYPE_CHECKING:
    from collections.abc import Iterable
    from importlib.metadata import Distribution

_BY_NAME = ("torchvision", "torchaudio", "torchtext")  # companions even without Requires-Dist
IMPORT_TIMEOUT = 120.0  # seconds for all the imports together
_MARK = "@@amp_magics.companions@@"
# Run in a fresh interpreter: a companion that crashes or hangs cannot take the kernel down, and
# nothing is imported into it. The subprocess sees the kernel's sys.path, as discovery did.
_IMPORT_SCRIPT = r"""
import importlib, json, sys, traceback
paths, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.path[:] = paths + [p for p in sys.path if p not in paths]
def say(**what):
    print("%s" + json.dumps(what), flush=True)
for module in modules:
    say(start=module)
    try:
        importlib.import_module(module)
    except BaseException as e:
        lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
        say(module=module, error=lines[-1] if lines else type(e).__name__)
    else:
        say(module=module, error=None)
""" % _MARK


@dataclass
class Companion:
    name: str  # as the distribution spells it
    version: str
    modules: list[str]  # top-level modules to import; empty when unknown


def _requires_torch(dist: Distribution) -> bool:
    """True when `dist` needs torch unconditionally (not only through an extra)."""
    for requirement in dist.requires or []:
        spec, _, marker = requirement.partition(";")
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if name and normalize(name.group(1)) == "torch" and "extra" not in marker:
            return True
    return False


def _top_level_modules(dist: Distribution, name: str, by_module: dict | None) -> list[str]:
    """The modules `dist` installs at the top level: top_level.txt, else its file list, else
    `packages_distributions()` (passed in as `by_module`, computed once by the caller)."""
    text = dist.read_text("top_level.txt")
    modules = {m.strip() for m in (text or "").splitlines() if m.strip() and "/" not in m}
    if not modules:
        for f in dist.files or []:
            parts = f.parts
            if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith((".dist-info", ".egg-info")):
                continue
            if len(parts) > 1 and parts[1] == "__init__.py":
                modules.add(parts[0])
            elif len(parts) == 1 and parts[0].endswith((".py", ".so", ".pyd")):
                modules.add(parts[0].split(".")[0])
    if not modules and by_module is not None:
        modules = {m for m, dists in by_module.items() if name in map(normalize, dists)}
    modules = {m for m in modules if m.isidentifier() and not m.startswith("_")
               and m not in ("test", "tests")}
    own = normalize(name).replace("-", "_")
    return [own] if own in modules else sorted(modules)[:3]


def find_companions() -> list[Companion]:
    """Installed distributions that need torch (plus torchvision, torchaudio and torchtext by
    name), except torch and amp_magics themselves."""
    found, by_module = [], None
    for key, dist in sorted(installed_distributions().items()):
        if key in ("torch", "amp-magics") or not (key in _BY_NAME or _requires_torch(dist)):
            continue
        if by_module is None and not dist.read_text("top_level.txt"):
            by_module = importlib.metadata.packages_distributions()
        name = dist.metadata["Name"]
        found.append(Companion(name, dist.version, _top_level_modules(dist, name, by_module)))
    return found


def import_in_subprocess(modules: Iterable[str], timeout: float = IMPORT_TIMEOUT
                         ) -> tuple[dict[str, str | None], str | None, str | None]:
    """Import `modules` one after another in ONE fresh Python.

    Returns ({module: the error's last line, or None when it imported}, the module being
    imported when the subprocess died or timed out, what happened to it). Modules after that
    one were never tried and are missing from the dict.
    """
    modules = list(modules)
    command = [sys.executable, "-c", _IMPORT_SCRIPT, json.dumps(sys.path), json.dumps(modules)]
    problem = None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        out = done.stdout
        if done.returncode != 0:
            problem = (f"killed Python (signal {-done.returncode})" if done.returncode < 0
                       else f"ended Python with exit code {done.returncode}")
            tail = (done.stderr or "").strip().splitlines()
            problem += f": {tail[-1].strip()}" if tail else ""
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        problem = f"did not finish within {timeout:g} s"
    except OSError as e:
        return {}, None, f"cannot start {sys.executable}: {e}"
    results: dict = {}
    started = None
    for line in out.splitlines():
        if not line.startswith(_MARK):
            continue  # what the imported packages print
        record = json.loads(line[len(_MARK):])
        if "start" in record:
            started = record["start"]
        else:
            results[record["module"]] = record["error"]
    stuck = started if problem and started is not None and started not in results else None
    return results, stuck, problem


def matching_companion_version(name: str, torch_version: str) -> str | None:
    """The release of torchvision/torchaudio/torchtext made for `torch_version`, None if unknown.

    PyTorch's table (github.com/pytorch/vision#installation): torch 2.m.p pairs with
    torchvision 0.(m+15).p and torchaudio 2.m.p, except 2.0.x (torchvision 0.15.1/0.15.2,
    torchaudio 2.0.1/2.0.2); torchtext 0.(m+15).p up to torch 2.2, its last minor.
    """
    match = re.match(r"2\.(\d+)\.(\d+)", torch_version)
    if not match:
        return None
    minor, patch = int(match.group(1)), int(match.group(2))
    if name == "torchvision":
        return {(0, 0): "0.15.1", (0, 1): "0.15.2"}.get((minor, patch), f"0.{minor + 15}.{patch}")
    if name == "torchaudio":
        return {(0, 0): "2.0.1", (0, 1): "2.0.2"}.get((minor, patch), f"2.{minor}.{patch}")
    if name == "torchtext" and 1 <= minor <= 2:
        return f"0.{minor + 15}.{patch}"
    return None


_TABLE_CHECKED_UP_TO = 9  # torch 2.9: newer pairs follow the same numbering, unverified here


def companion_fix(companion: Companion, torch_version: str) -> str:
    """How to install the build of `companion` that matches this torch."""
    name = companion.name
    local = torch_version.partition("+")[2]
    if local and not BUILD_TAG.fullmatch(local):
        return (f"torch {torch_version} is not a PyPI or download.pytorch.org build: build {name} "
                f"from source against it, or install torch and {name} together: {GET_TORCH}")
    index = f" --index-url {PYTORCH_INDEX}{local}" if local else ""
    version = matching_companion_version(normalize(name), torch_version)
    if version is None:
        if normalize(name) in _BY_NAME:
            return (f"install the {name} release that matches torch {torch_version} (pip install "
                    f"--force-reinstall --no-deps {name}==<that version>{index}), or reinstall "
                    f"torch and {name} together: {GET_TORCH}")
        return (f"reinstall {name} for torch {torch_version}: pip install --force-reinstall "
                f"{name}, checking that pip leaves torch as it is; a package built per torch "
                "version names the wheel for yours in its install notes")
    fix = f"pip install --force-reinstall --no-deps {name}=={version}{index}"
    minor = int(re.match(r"2\.(\d+)", torch_version).group(1))
    if minor > _TABLE_CHECKED_UP_TO:
        fix += (f" ({version} is the {name} release matching torch {torch_version.partition('+')[0]} "
                "by PyTorch's numbering; github.com/pytorch/vision#installation has the table)")
    else:
        fix += f" (the {name} built for torch {torch_version})"
    return fix

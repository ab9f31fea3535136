"""The environment a notebook uses, written down: every installed distribution as a conda
environment file (conda and pip sections, as `conda env export` splits them), with torch
pinned the way PyTorch's install page pins it, so that others can rebuild it.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys
import time
from typing import TYPE_CHECKING

import yaml

from .. import __version__

if TYPE_CHECKING:
    from importlib.metadata import Distribution

PYTORCH_INDEX = "https://download.pytorch.org/whl/"
GET_TORCH = "pick the build for your driver at https://pytorch.org/get-started/locally/"
BUILD_TAG = re.compile(r"(cpu|cu\d+|rocm\d+(\.\d+)*|xpu)")  # the local tags PyTorch's index serves


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, Distribution]:
    """Every distribution this Python imports from, by normalized name; where a name is found
    twice, the one first on sys.path (the one `import` gets)."""
    found: dict = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in found:
            found[normalize(name)] = dist
    return found


_NOT_EXPORTED = ("pip", "setuptools", "wheel")  # pip brings its own
_DEFAULT_CHANNELS = ["pytorch", "conda-forge", "defaults"]
_CONDA_ALIASES = {"pytorch": "torch"}  # conda name -> distribution name, where they differ


def conda_prefix() -> str | None:
    """sys.prefix when this Python is a conda environment's, else None."""
    active = os.environ.get("CONDA_PREFIX")
    if (active and os.path.realpath(active) == os.path.realpath(sys.prefix)) or os.path.isdir(
            os.path.join(sys.prefix, "conda-meta")):
        return sys.prefix
    return None


def conda_packages(prefix: str) -> list[dict]:
    """The packages conda installed in `prefix` (its conda-meta/*.json records)."""
    meta = os.path.join(prefix, "conda-meta")
    records = []
    try:
        names = sorted(os.listdir(meta))
    except OSError:
        return []
    for file in names:
        if not file.endswith(".json"):
            continue
        try:
            with open(os.path.join(meta, file)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("name") and record.get("version"):
            records.append(record)
    return records


def _conda_owned(record: dict) -> set[str]:
    """Normalized names of the Python distributions a conda package installed."""
    owned = {normalize(_CONDA_ALIASES.get(record["name"], record["name"]))}
    for path in record.get("files") or []:
        parts = str(path).replace("\\", "/").split("/")
        for part in parts[:-1]:
            if part.endswith((".dist-info", ".egg-info")):
                owned.add(normalize(part.rsplit(".", 1)[0].split("-")[0]))
    return owned


def _conda_channel(record: dict) -> str:
    channel = str(record.get("schannel") or record.get("channel") or "")
    channel = re.sub(r"^https?://conda\.anaconda\.org/", "", channel.rstrip("/"))
    channel = re.sub(r"/(noarch|(linux|osx|win)-[a-z0-9_]+)$", "", channel)
    if channel.startswith(("pkgs/", "https://repo.anaconda.com/pkgs/")) or channel == "defaults":
        return "defaults"
    return channel


def _pip_lines(dists: dict[str, Distribution]) -> tuple[list[str], list[str]]:
    """Requirement lines pinning `dists` exactly, torch's build through PyTorch's index, and
    notes on the pins a reader should know about."""
    indexes, lines, notes = [], [], []
    for key, dist in sorted(dists.items()):
        name, version = dist.metadata["Name"], dist.version
        public, _, local = version.partition("+")
        if key == "amp-magics":
            if _editable(dist) or _from_clone():
                notes.append(f"# {name} runs from a clone here: to rebuild from the clone, "
                             "`pip install -e .` there instead of this pin")
            lines.append(f"{name}=={version or __version__}")
            continue
        origin = _direct_url(dist)
        vcs = origin.get("vcs_info") if origin else None
        if origin and vcs and vcs.get("commit_id") and origin.get("url"):
            lines.append(f"{name} @ {vcs.get('vcs', 'git')}+{origin['url']}@{vcs['commit_id']}")
            continue
        if origin and _editable(dist):
            notes.append(f"# {name} is installed editable from a local directory here: the pin "
                         "takes the release")
        elif origin and str(origin.get("url", "")).startswith("file:"):
            notes.append(f"# {name} is installed from a local file here: the pin takes the release")
        if local and BUILD_TAG.fullmatch(local):
            # torch 2.4.0+cu121 and its companions live on PyTorch's own index, named by the
            # tag. `torch==2.4.0` would also take the +cu121 build from there (a local version
            # sorts above the plain one), but the tag pins the build even without the index.
            index = f"--extra-index-url {PYTORCH_INDEX}{local}"
            if index not in indexes:
                indexes.append(index)
        elif local:
            notes.append(f"# {name} {version} is a local build: the pin drops its local tag "
                         f"(+{local}), which no index has")
            version = public
        lines.append(f"{name}=={version}")
    return indexes + lines, notes


def _direct_url(dist: Distribution) -> dict | None:
    """PEP 610's direct_url.json: where pip installed `dist` from, when not from an index."""
    try:
        origin = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        return None
    return origin if isinstance(origin, dict) else None


def _from_clone() -> bool:
    """True when amp_magics runs from a source tree (an editable install or the clone itself)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.isfile(os.path.join(os.path.dirname(root), "pyproject.toml"))


def _editable(dist: Distribution) -> bool:
    origin = _direct_url(dist) or {}
    return bool((origin.get("dir_info") or {}).get("editable"))


def environment_yml() -> str:
    """This Python's environment as a conda environment file, as `conda env export` writes it:
    every installed distribution, the conda packages (in a conda environment) with their
    builds, the rest pinned under `pip:`. pip, setuptools and wheel are left to pip itself."""
    dists = {k: d for k, d in installed_distributions().items() if k not in _NOT_EXPORTED}
    prefix = conda_prefix()
    # conda lists what pip installed with channel "pypi": that goes under pip:, as conda does
    records = [r for r in conda_packages(prefix) if _conda_channel(r) != "pypi"] if prefix else []
    env = os.environ.get("CONDA_DEFAULT_ENV")
    if prefix and env and os.sep in env:
        env = os.path.basename(env)  # an environment activated by its path
    elif prefix and not env and os.path.basename(os.path.dirname(prefix)) == "envs":
        env = os.path.basename(prefix)  # a kernel started without `conda activate`
    name = env if prefix and env and env != "base" else "amp-magics"  # `conda env create` refuses "base"
    if records:
        owned = set().union(*map(_conda_owned, records))
        conda = [f"{r['name']}={r['version']}" + (f"={r['build']}" if r.get("build") else "")
                 for r in sorted(records, key=lambda r: r["name"])]
        found = list(dict.fromkeys(c for c in map(_conda_channel, records) if c))
        first = [c for c in ("pytorch", "nvidia") if c in found]
        channels = first + [c for c in found if c not in first and c != "defaults"]
        channels += ["defaults"] if "defaults" in found or not channels else []
        if not any(r["name"] == "pip" for r in records):
            conda.append("pip")
    else:
        owned = set()
        conda = [f"python={sys.version_info.major}.{sys.version_info.minor}", "pip"]
        channels = _DEFAULT_CHANNELS
    pip, notes = _pip_lines({k: d for k, d in dists.items() if k not in owned})
    pinned = sum(not p.startswith("-") for p in pip)
    kind = f"conda environment ({len(records)} conda packages" if records else "Python environment ("
    header = [
        f"# Written by amp_magics on {time.strftime('%Y-%m-%d')} from a {kind}"
        f"{', ' if records else ''}{pinned} pip packages, Python {platform.python_version()}).",
        "# Rebuild with: conda env create -f <this file>", *notes]
    document = {"name": name, "channels": channels,
                "dependencies": conda + ([{"pip": pip}] if pip else [])}
    return "\n".join(header) + "\n" + yaml.safe_dump(document, sort_keys=False, width=1000)


def export_environment(path: str | os.PathLike) -> str:
    """Write `environment_yml()` to `path`; returns the path written."""
    with open(path, "w") as f:
        f.write(environment_yml())
    return os.fspath(path)

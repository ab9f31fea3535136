"""The JupyterLab half of the extension: a Jupyter Server extension serving GPU and AMP-run
status at `{base_url}api/amp_magics/v1/status` (handlers.py), and the prebuilt status-bar
extension that polls it (labextension/, installed as data files). Nothing here imports torch.
"""
from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "amp_magics.lab"}]


def _jupyter_labextension_paths() -> list[dict]:
    return [{"src": "labextension", "dest": "amp-magics"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    from .handlers import setup_handlers

    setup_handlers(server_app.web_app)
    server_app.log.info("amp_magics: GPU and AMP run status at /api/amp_magics/v1/status")

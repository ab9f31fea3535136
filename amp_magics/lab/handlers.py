"""The server's side: `GET {base_url}api/amp_magics/v1/status`, authenticated as every
Jupyter Server API is."""
from __future__ import annotations

import json

import tornado
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from .status import StatusCache

ROUTE = ("api", "amp_magics", "v1", "status")


class StatusHandler(APIHandler):
    @tornado.web.authenticated
    async def get(self) -> None:
        cache: StatusCache = self.settings["amp_magics_status"]
        self.set_header("Content-Type", "application/json")
        answer = await cache.get(self.kernel_manager.list_kernel_ids())
        self.finish(json.dumps(answer, allow_nan=False))  # browsers parse strict JSON only


def setup_handlers(web_app, ttl: float = 1.0) -> None:
    web_app.settings["amp_magics_status"] = StatusCache(ttl)
    pattern = url_path_join(web_app.settings["base_url"], *ROUTE)
    web_app.add_handlers(".*$", [(pattern, StatusHandler)])

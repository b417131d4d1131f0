"""Who may call the endpoint: the API key, and refusing an open endpoint beyond loopback.

The key comes from serve.api_key or the environment and stays in memory: the run
folder's config.yaml and the trackers get the config without it
(`Config.dump_without_secrets`). Requests compare it in constant time (app.py).
"""
from __future__ import annotations

import ipaddress
import os

from rlhf.config import Config, ServeConfig

API_KEY_ENV = "INSTRUCTRAY_API_KEY"


def serving_key(serve_cfg: ServeConfig) -> str | None:
    """The endpoint's API key: serve.api_key, else the environment's."""
    return serve_cfg.api_key or os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def check_servable(cfg: Config) -> list[tuple[str, str]]:
    """An endpoint reachable from other machines must ask for a key, unless told otherwise."""
    if is_loopback(cfg.serve.host) or serving_key(cfg.serve) or cfg.serve.allow_unauthenticated:
        return []
    return [("serve.host", f"reachable beyond this machine with no API key: set serve.api_key or "
             f"{API_KEY_ENV}, or serve.allow_unauthenticated=true if an open endpoint is meant")]

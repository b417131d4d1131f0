"""The endpoint as a Ray Serve application, for Serve's own tools (`serve run`, `serve deploy`).

`instructray serve RUN` is one way to start it; a Serve config file is the other, which
is how Ray clusters deploy and update applications:

    serve run orchestration.serve.deploy:app_builder target=runs/tiny
    serve run configs/serve/instructray.yaml                # the same, from a Serve config file
    serve deploy configs/serve/instructray.yaml             # onto a running cluster

`app_builder` gets the config file's `args` (or the command line's key=value pairs):
`target` (a run directory or an HF checkpoint, as for `instructray serve`), optionally
`config` (a preset or YAML file; the default preset otherwise), and any dotted override
such as `serve.num_replicas: 2`. Host and port are Serve's (`http_options` in the file).
"""
from __future__ import annotations

from typing import Any

from orchestration.serve import vllm_app
from orchestration.serve.app import build_app, model_name_for, resolve_checkpoint
from rlhf.config import ConfigError, load_config


def app_builder(args: dict[str, Any]):
    """The Serve application for `args` (see the module docstring); bad args raise ConfigError."""
    args = dict(args)
    target = args.pop("target", None)
    if not target:
        raise ConfigError("serve application args: target (a run directory or an HF checkpoint) is required")
    cfg = load_config(args.pop("config", None), [f"{k}={v}" for k, v in args.items()])
    checkpoint = resolve_checkpoint(target)
    name = model_name_for(checkpoint)
    if vllm_app.should_use(cfg):
        return vllm_app.build_vllm_app(checkpoint, cfg, name)
    return build_app(checkpoint, cfg.serve, name, dtype=cfg.model.dtype)

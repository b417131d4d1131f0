"""Connect to Ray: an existing cluster when there is one, else a local one."""
from __future__ import annotations

import logging
import os

import ray

import rlhf
from rlhf.config import Config

log = logging.getLogger(__name__)
# The actors' working environment: no hub access, quiet tokenizers.
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
WORKER_ONLY_ENV = rlhf.WORKER_ENV  # not the driver's: see rlhf/__init__.py


def connect(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (or the job we run inside); else start locally.

    Also sets the actors' working environment (ACTOR_ENV).
    """
    if ray.is_initialized():
        return
    os.environ.update(ACTOR_ENV)
    env = ACTOR_ENV | WORKER_ONLY_ENV
    if os.environ.get("RAY_ADDRESS"):
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(runtime_env={"env_vars": env})
    else:
        num_cpus = cfg.resources.num_cpus
        log.info("starting a local Ray cluster (%s CPUs)", num_cpus or "all")
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, include_dashboard=False)

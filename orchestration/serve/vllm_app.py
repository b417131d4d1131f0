"""GPU serving: `ray.serve.llm` (vLLM behind Ray Serve's OpenAI app) for the same checkpoint.

Used by `instructray serve` when vLLM is installed and the cluster has GPUs.
The routes are ray.serve.llm's (/v1/completions, /v1/chat/completions,
/v1/models, streaming); ray.serve.llm has no API-key check of its own, so
with a key configured we refuse to start rather than serve unauthenticated.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from orchestration.serve.auth import serving_key
from rlhf.config import Config


def should_use(cfg: Config) -> bool:
    """vLLM installed, GPUs in the cluster and not pinned to the CPU."""
    if cfg.run.device == "cpu" or importlib.util.find_spec("vllm") is None:
        return False
    import ray
    return ray.cluster_resources().get("GPU", 0) > 0


def llm_config_kwargs(checkpoint: Path, cfg: Config, model_name: str) -> dict:
    """Arguments of `ray.serve.llm.LLMConfig` (a plain dict, checked by the contract test)."""
    return dict(
        model_loading_config=dict(model_id=model_name, model_source=str(checkpoint)),
        engine_kwargs=dict(
            tensor_parallel_size=cfg.resources.gpus_per_generator,
            max_model_len=cfg.model.context_length,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
        ),
        deployment_config=dict(num_replicas=cfg.serve.num_replicas),
    )


def build_vllm_app(checkpoint: Path, cfg: Config, model_name: str):
    """The ray.serve.llm OpenAI application for `checkpoint`."""
    if serving_key(cfg.serve):
        raise RuntimeError("serve.api_key is set but ray.serve.llm does not check API keys; "
                           "unset it (and front the endpoint yourself) or run.device=cpu")
    from ray.serve.llm import LLMConfig, build_openai_app

    llm_config = LLMConfig(**llm_config_kwargs(checkpoint, cfg, model_name))
    return build_openai_app(serving_args(llm_config, cfg))


def serving_args(llm_config, cfg: Config) -> dict:
    """`build_openai_app`'s arguments: the model, and the HTTP ingress's admission limits
    (the deployment HTTP requests reach first, so it is where the excess is shed)."""
    from orchestration.serve.app import admission

    return {"llm_configs": [llm_config], "ingress_deployment_config": admission(cfg.serve)}

"""The `vllm` engine: vLLM 0.33 `LLM` on token-id prompts; weights in through vLLM's weight transfer.

GPU only (vLLM ships no CPU kernels), so everything checkable without a GPU is a
pure function here: the exact keyword arguments we hand vLLM (`llm_kwargs`,
`sampling_params_kwargs`, `generate_kwargs`) and the conversion of vLLM's outputs
into `Samples`. tests/contract runs them against the real vllm package.

Logprobs: `logprobs_mode="processed_logprobs"` makes vLLM report the sampled
token's logprob under the distribution it sampled from (temperature and top-p
applied), the same quantity the `hf` engine reports; `logprobs=0` returns exactly
that one token per step. vLLM's numbers still differ slightly from the learner's,
which is why the learner recomputes old logprobs.

Weights: vLLM keeps them in its own fused layout and dtype, so the checksum the
driver compares (`actors.weight_sync.checksum`, learner names and dtypes) is taken
over what each worker was *sent*: `ReceivedWeightsExtension` (mixed into every
vLLM worker) keeps a CPU copy of every tensor that reaches `model.load_weights`,
whichever transport delivered it. That costs one CPU copy of the policy per
worker; pass `record_received=False` to skip it (then `state_checksum` raises).
After every weight update the prefix cache is reset: cached KV from the old
weights would otherwise be reused for new samples.
"""
from __future__ import annotations

import random
from typing import Any, Iterable, Sequence

import torch

from actors.weight_sync import checksum
from rlhf.sampling import Samples, left_pad

WORKER_EXTENSION = "actors.engines.vllm_engine.ReceivedWeightsExtension"


# ---------------------------------------------------------------- what we pass vLLM

def llm_kwargs(policy_path: str, *, seed: int, tensor_parallel_size: int = 1,
               gpu_memory_utilization: float = 0.85, dtype: str = "auto",
               weight_transfer_backend: str | None = "nccl", enable_prefix_caching: bool = True,
               max_model_len: int | None = None, record_received: bool = True,
               **extra: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` (the rest go to vLLM's `EngineArgs`)."""
    from vllm.config import WeightTransferConfig

    kw: dict[str, Any] = dict(
        model=str(policy_path), tokenizer=str(policy_path), seed=seed, dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        enable_prefix_caching=enable_prefix_caching,
        logprobs_mode="processed_logprobs",
    )
    if weight_transfer_backend is not None:
        kw["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer_backend)
    if record_received:
        kw["worker_extension_cls"] = WORKER_EXTENSION
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    kw.update(extra)
    return kw


def colocated_kwargs(gpu_memory_utilization: float) -> dict[str, Any]:
    """Engine kwargs of a generator that shares its GPU with learners: sleep mode (its memory
    is theirs while they train), weights over CUDA IPC (NCCL refuses two ranks on one
    device), and a bounded share of the GPU when awake."""
    return dict(enable_sleep_mode=True, weight_transfer_backend="ipc",
                gpu_memory_utilization=gpu_memory_utilization)


def sampling_params_kwargs(max_new_tokens: int, temperature: float, top_p: float,
                           seed: int | None, eos_id: int) -> dict[str, Any]:
    """One row's `SamplingParams`: plain sampling (top_k=0 is vLLM's "off"), ids only."""
    return dict(n=1, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new_tokens,
                logprobs=0, seed=seed, detokenize=False, stop_token_ids=[eos_id])


def row_seeds(seed: int | None, n: int) -> list[int | None]:
    """Distinct per-row seeds drawn from `seed`: one seed for all rows would give identical
    samples for identical prompts (K completions of one prompt). None = engine's stream."""
    if seed is None:
        return [None] * n
    rng = random.Random(seed)
    return [rng.getrandbits(63) for _ in range(n)]


def generate_kwargs(prompts: Sequence[Sequence[int]], params: Sequence[Any]) -> dict[str, Any]:
    """Arguments of `LLM.generate`: one `TokensPrompt` and one `SamplingParams` per row."""
    from vllm import TokensPrompt

    return dict(prompts=[TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
                sampling_params=list(params), use_tqdm=False)


# ---------------------------------------------------------------- what vLLM gives back

def sampled_logprobs(completion: Any) -> list[float]:
    """log p(token_t | <t) of each sampled token, from `logprobs[t][token_t].logprob`."""
    if completion.logprobs is None:
        raise ValueError("completion has no logprobs; sample with SamplingParams(logprobs=0)")
    tokens = list(completion.token_ids)
    if len(completion.logprobs) != len(tokens):
        raise ValueError(f"{len(completion.logprobs)} logprob steps for {len(tokens)} tokens")
    out = []
    for t, tok in enumerate(tokens):
        step = completion.logprobs[t]
        if tok not in step:
            raise ValueError(f"step {t}: no logprob for the sampled token {tok}")
        out.append(float(step[tok].logprob))
    return out


def request_outputs_to_samples(prompts: Sequence[Sequence[int]], outputs: Sequence[Any],
                               pad_id: int) -> Samples:
    """vLLM `RequestOutput`s (one completion each, in prompt order) as `Samples`.

    Prompts are left-padded, responses right-padded; the response keeps the EOS that
    ended it (vLLM includes it in `token_ids`), and that EOS is an action.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"{len(outputs)} outputs for {len(prompts)} prompts")
    responses, logps = [], []
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        if list(out.prompt_token_ids) != [int(t) for t in prompt]:
            raise ValueError(f"output {i} belongs to another prompt (rows out of order)")
        if len(out.outputs) != 1:
            raise ValueError(f"output {i} has {len(out.outputs)} completions; expected 1")
        responses.append([int(t) for t in out.outputs[0].token_ids])
        logps.append(sampled_logprobs(out.outputs[0]))
    ids, mask = left_pad(prompts, pad_id)
    batch, width = ids.shape
    length = max(len(r) for r in responses)
    resp_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((batch, length), dtype=torch.long)
    resp_logp = torch.zeros((batch, length), dtype=torch.float32)
    for i, (r, lp) in enumerate(zip(responses, logps)):
        resp_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        resp_mask[i, : len(r)] = 1
        resp_logp[i, : len(r)] = torch.tensor(lp, dtype=torch.float32)
    return Samples(input_ids=torch.cat([ids, resp_ids], 1),
                   attention_mask=torch.cat([mask, resp_mask], 1),
                   action_mask=torch.cat([torch.zeros_like(mask), resp_mask], 1),
                   sampler_logprobs=torch.cat([torch.zeros(batch, width), resp_logp], 1),
                   prompt_width=width)


# ---------------------------------------------------------------- inside each vLLM worker

def to_wire(named: Iterable[tuple[str, torch.Tensor]]) -> list[list]:
    """Named tensors as msgpack-native [name, dtype, shape, bytes].

    `collective_rpc` arguments cross vLLM's engine-core socket as untyped msgpack,
    where a tensor arrives as a bare [dtype, shape, buffer] list, not a tensor.
    """
    out = []
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # any dtype, bfloat16 included
        out.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), raw])
    return out


def from_wire(items: Iterable[Sequence]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `to_wire`."""
    out = []
    for name, dtype, shape, raw in items:
        dt = getattr(torch, dtype)
        flat = torch.frombuffer(bytearray(raw), dtype=dt) if len(raw) else torch.empty(0, dtype=dt)
        out.append((name, flat.reshape(tuple(shape))))
    return out


class ReceivedWeightsExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called by `collective_rpc`.

    Names carry our prefix: vLLM refuses an extension attribute the worker already has.
    """

    def instructray_watch_loads(self) -> None:
        """Wrap the model's `load_weights` so every tensor it is given is remembered."""
        model = self.model_runner.get_model()
        if "_instructray_received" in model.__dict__:
            return
        received: dict[str, torch.Tensor] = {}
        original = model.load_weights

        def load_weights(weights, *args, **kwargs):
            weights = list(weights)
            for name, tensor in weights:
                received[name] = tensor.detach().to("cpu", copy=True)
            return original(weights, *args, **kwargs)

        model.load_weights = load_weights
        model._instructray_received = received

    def instructray_load_weights(self, items: list[list]) -> None:
        """CPU transport: load learner-named tensors (`to_wire` form) through the model's loader."""
        self.model_runner.get_model().load_weights(weights=from_wire(items))

    def instructray_received_checksum(self) -> str | None:
        received = self.model_runner.get_model().__dict__.get("_instructray_received")
        return checksum(received.items()) if received else None


# ---------------------------------------------------------------- the engine

def special_ids(policy_path: str, eos_id: int | None, pad_id: int | None) -> tuple[int, int]:
    """(eos, pad) as the `hf` engine picks them: generation config, then model config."""
    from transformers import AutoConfig, GenerationConfig

    def first(v):
        return (int(v[0]) if v else None) if isinstance(v, (list, tuple)) else (None if v is None else int(v))

    if eos_id is None or pad_id is None:
        cfg = AutoConfig.from_pretrained(str(policy_path))
        if eos_id is None:
            try:
                gen = GenerationConfig.from_pretrained(str(policy_path))
            except OSError:  # no generation_config.json: HF derives it from the model config
                gen = GenerationConfig.from_model_config(cfg)
            eos_id = first(gen.eos_token_id) if gen.eos_token_id is not None else first(cfg.eos_token_id)
        if pad_id is None:
            pad_id = first(cfg.pad_token_id)
    if eos_id is None:
        raise ValueError(f"{policy_path}: no eos_token_id in its config; pass eos_id")
    # Padding is masked everywhere, so EOS as its id is safe.
    return eos_id, (pad_id if pad_id is not None else eos_id)


class VLLMEngine:
    """One vLLM copy of the policy; implements `actors.engines.base.Engine` (GPU only).

    Weight updates, either transport:
    - vLLM weight transfer (NCCL / CUDA IPC), driven by the learner through
      `actors.weight_transport_vllm`: `init_weight_transfer_engine`, then per sync
      `start_weight_update`, `update_weights` (one or more), `finish_weight_update`;
    - CPU buckets through the Ray object store: `load_weights` (generator.update_weights).
    """

    def __init__(self, policy_path: str, *, seed: int = 0, eos_id: int | None = None,
                 pad_id: int | None = None, record_received: bool = True, **kw: Any) -> None:
        from vllm import LLM

        self.eos_id, self.pad_id = special_ids(policy_path, eos_id, pad_id)
        self.record_received = record_received
        self.llm = LLM(**llm_kwargs(policy_path, seed=seed, record_received=record_received, **kw))
        if record_received:
            self.llm.collective_rpc("instructray_watch_loads")

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None) -> Samples:
        from vllm import SamplingParams

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, each with at least one token")
        params = [SamplingParams(**sampling_params_kwargs(max_new_tokens, temperature, top_p, s,
                                                          self.eos_id))
                  for s in row_seeds(seed, len(prompts))]
        outputs = self.llm.generate(**generate_kwargs(prompts, params))
        return request_outputs_to_samples(prompts, outputs, self.pad_id)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], borrow: bool = False) -> None:
        # vLLM always copies into its own (GPU) weights: `borrow` changes nothing here.
        self.llm.collective_rpc("instructray_load_weights", args=(to_wire(named_tensors),))
        self._reset_prefix_cache()

    def state_checksum(self) -> str:
        if not self.record_received:
            raise RuntimeError("state_checksum needs VLLMEngine(record_received=True)")
        digests = self.llm.collective_rpc("instructray_received_checksum")
        if digests[0] is None:
            raise RuntimeError("no weights received yet: the checksum covers synced weights only")
        if len(set(digests)) != 1:
            raise RuntimeError(f"vLLM workers hold different weights: {digests}")
        return digests[0]

    # ---- vLLM weight transfer, engine side (the learner drives it) ----
    def transfer_world_size(self) -> int:
        """Workers of this engine in the trainer's NCCL group (tensor x pipeline parallel)."""
        return self.llm.get_world_size(include_dp=False)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    def finish_weight_update(self, weight_version: int | None = None) -> None:
        """Commit the update; the version labels vLLM's own record (the generator keeps ours)."""
        self.llm.finish_weight_update(
            weight_version=None if weight_version is None else str(weight_version))
        self._reset_prefix_cache()

    # ---- colocated (IPC) mode: free the GPU while the learner trains ----
    # Needs `LLM(**colocated_kwargs(...))`. The caller wakes what is asleep and nothing else:
    # vLLM's executor ignores a whole wake_up call that names one tag not asleep.
    def sleep(self, level: int = 1) -> None:
        """Level 1: weights offloaded to CPU memory, KV cache discarded (no request may be running)."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Back on the GPU: `tags` of ("weights", "kv_cache"), or everything. The KV cache comes
        back empty, so the prefix cache (hashes of what it held) is reset with it."""
        awake = self.llm.wake_up(tags=None if tags is None else list(tags))
        if tags is None and not awake:
            raise RuntimeError("vLLM did not wake up fully")
        if tags is None or "kv_cache" in tags:
            self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache; stale KV would be reused")

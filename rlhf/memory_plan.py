"""The memory plan: bytes per GPU of every role of a run, and whether each fits its GPU.

Roles: the PPO actors of `rlhf.placement.actor_specs` (policy and critic learner ranks,
reward and reference scorers, generators) and the stage trainers (pretrain, SFT, RM),
each on its own GPUs; with `resources.colocate` every role shares the same GPUs and a
GPU's peak is the largest of three phases (`colocated_phases`). The byte formulas are
in `rlhf.memory_math`; this module only reads a Config. `--dry-run` prints the plan
(orchestration/plan.py) and `check_geometry` refuses a layout with a role over its GPU.
The arithmetic is explained in docs/memory_plan.md.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhf import memory_math as mm
from rlhf.config import Config
from rlhf.memory_math import CAUSAL_LM_FORWARD_KEEPS_KV
from rlhf.placement import actor_specs

# vLLM reserves this share of each GPU (actors/engines/vllm_engine.llm_kwargs' default; a test compares).
VLLM_GPU_MEMORY_UTILIZATION = 0.85
# The batch the learners and scorers score rollouts in (forward_batch_size / batch_size defaults).
SCORING_ROWS = 64


@dataclass(frozen=True)
class RoleMemory:
    """Bytes on one GPU of a role at its worst moment (`phase`)."""
    role: str
    title: str
    gpus: int               # GPUs the whole role occupies
    weights: float
    grads: float
    optimizer: float
    activations: float      # activations and temporaries of the peak phase
    kv_cache: float
    runtime: float          # CUDA context, workspaces, NCCL (0 on CPU)
    phase: str              # what the peak is: train / score / step / generate
    hint: str = ""          # what to change when it does not fit
    blame: str = "resources.num_gpus"  # the config field a refusal names
    at: dict[str, float] = field(default_factory=dict)  # phase -> total bytes; "idle" = between its phases

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.kv_cache + self.runtime


@dataclass(frozen=True)
class MemoryPlan:
    capacity: float                          # bytes of one GPU
    roles: list[RoleMemory]
    colocated: dict[str, float] | None = None  # phase -> bytes on the fullest GPU
    unknown: list[str] = field(default_factory=list)  # models whose shape the plan cannot know

    def problems(self) -> list[tuple[str, str]]:
        """(config field, message) for every role (or colocated phase) over its GPU."""
        cap = self.capacity / mm.GB
        out = []
        if self.colocated is not None:
            phase, need = max(self.colocated.items(), key=lambda kv: kv[1])
            ppo = [r for r in self.roles if r.role in PPO_ROLES]
            if need > self.capacity:
                out.append(("resources.colocate", f"the colocated PPO roles need {need / mm.GB:.1f} GB per GPU "
                            f"in their {phase} phase, {need / mm.GB - cap:.1f} GB over the {cap:g} GB GPU: "
                            "give the roles GPUs of their own (resources.colocate=false) or shard the learners "
                            "over more GPUs"))
            roles = [r for r in self.roles if r not in ppo]
        else:
            roles = self.roles
        for r in roles:
            if r.total > self.capacity:
                out.append((r.blame, f"{r.title} needs {r.total / mm.GB:.1f} GB per GPU, "
                            f"{r.total / mm.GB - cap:.1f} GB over the {cap:g} GB GPU ({r.phase} phase): {r.hint}"))
        return out


PPO_ROLES = ("learner", "critic", "reward", "reference", "generator")


# ---------------------------------------------------------------- model shapes

def model_shape(cfg: Config, which: str = "policy") -> mm.ModelShape | None:
    """The policy's (or the reward/value model's) shape; None when the plan cannot know it."""
    name = cfg.model.policy if which == "policy" or cfg.model.reward is None else cfg.model.reward
    shape = _shape_of(cfg, name)
    if shape is None or which == "policy" or not cfg.rm.added_layers:
        return shape
    return dataclasses.replace(shape, layers=shape.layers + cfg.rm.added_layers)  # the RM stage deepens it


def _shape_of(cfg: Config, name: str) -> mm.ModelShape | None:
    if name == "tiny":
        t = cfg.model.tiny
        return mm.ModelShape("tiny", t.n_layer, t.n_embd, t.n_head, t.vocab_size, 4 * t.n_embd,
                             t.n_positions or cfg.model.context_length)
    config_json = Path(name) / "config.json"
    if config_json.exists():
        return mm.shape_from_hf_config(name, json.loads(config_json.read_text()))
    return mm.KNOWN_SHAPES.get(name)


# ---------------------------------------------------------------- one trained role

@dataclass(frozen=True)
class Training:
    """How a trainer holds and runs its model (`rlhf.sharding.TrainLayout` plus its batch)."""
    shape: mm.ModelShape
    head: str             # "lm" or "scalar"
    ranks: int            # the group's ranks (FSDP shards over them)
    passes: list[tuple[int, int, str, bool]]  # (rows, seq, loss, padded) per forward+backward
    grad_copies: int      # float32 gradient buffers at the end of backward
    resident_grads: int   # of which stay between steps
    ema: bool = False
    dropout: bool = False
    kv_kept: bool = CAUSAL_LM_FORWARD_KEEPS_KV  # only LM heads: ScalarModel turns use_cache off
    scoring_rows: int = 0  # rows of the no-grad scoring forward, 0 = none
    scoring_seq: int = 0


def trained_role(cfg: Config, t: Training, role: str, title: str, gpus: int, group: str,
                 field_name: str, mb_field: str) -> RoleMemory:
    """A trained role's peak over its phases; `group`, `field_name`, `mb_field` name what to change."""
    r = cfg.resources
    c = mm.dtype_bytes(cfg.model.dtype)
    cuda = r.num_gpus > 0
    st = mm.train_state(t.shape, t.head, c, t.ranks, r.strategy == "fsdp", t.grad_copies, t.resident_grads,
                        t.ema, cuda)
    act = max(mm.train_activation_bytes(t.shape, rows, seq, c, loss, r.activation_checkpointing,
                                        t.kv_kept and t.head == "lm", t.dropout, padded)
              for rows, seq, loss, padded in t.passes)
    runtime = mm.CUDA_RUNTIME_BYTES if cuda else 0.0
    # phase -> (weights, gradients, activations and temporaries); Adam's state stays throughout.
    computing = st.master + st.compute_copy
    parts = {"train": (computing, st.grads + st.grads_gathered, act),
             "step": (st.master, st.grads, st.step_transient)}
    if t.scoring_rows:
        parts["score"] = (computing, st.grads_resident, mm.inference_bytes(
            t.shape, t.scoring_rows, t.scoring_seq, c, t.head, t.kv_kept and t.head == "lm"))
    at = {k: st.optimizer + runtime + sum(v) for k, v in parts.items()}
    at["idle"] = st.master + st.grads_resident + st.optimizer + runtime
    phase = max(parts, key=at.get)
    weights, grads, extra = parts[phase]
    hint = _learner_hint(cfg, group, field_name, mb_field, activations=phase == "train")
    return RoleMemory(role, title, gpus, weights, grads, st.optimizer, extra, 0.0, runtime,
                      phase, hint, field_name, at)


def _learner_hint(cfg: Config, group: str, workers_field: str, mb_field: str, activations: bool) -> str:
    r, steps = cfg.resources, []
    if r.strategy == "ddp":
        steps.append(f"use resources.strategy=fsdp to shard weights, gradients and Adam over the {group}")
    else:
        steps.append(f"raise {workers_field} (more ranks to shard over"
                     + ("; each also scores a smaller share of the batch)" if workers_field.startswith("ppo.") else ")"))
    if cfg.model.dtype == "float32":
        steps.append("model.dtype=bfloat16")
    if activations and not r.activation_checkpointing:
        steps.append("resources.activation_checkpointing=true")
    if activations:
        steps.append(f"a smaller {mb_field}")
    return ", or ".join(steps)


# ---------------------------------------------------------------- the PPO roles

def ppo_roles(cfg: Config, policy: mm.ModelShape, value: mm.ModelShape) -> list[RoleMemory]:
    p, m, r = cfg.ppo, cfg.model, cfg.resources
    specs = {s.role: s for s in actor_specs(cfg, total_cpus=1.0)}
    n = p.num_learners
    mb, ptx_rows = learner_pieces(cfg)
    seq = m.max_prompt_tokens + m.max_response_tokens
    c = mm.dtype_bytes(m.dtype)
    cuda = r.num_gpus > 0
    runtime = mm.CUDA_RUNTIME_BYTES if cuda else 0.0
    ptx = [(ptx_rows, cfg.ptx_block_tokens, "lm", False)] if ptx_rows else []
    scoring_rows = learner_scoring_rows(cfg)
    group = ("policy and critic groups", "ppo.num_learners", "ppo.micro_batch_size")
    roles = [
        # The policy: PPO backward, then ptx backward into the same gradients (the larger
        # pass's peak counts); .grad plus the flat buckets (actors.group.BucketedGrads: the
        # all-reduce under ddp, the PPO part's norm under both; this rank's shard under
        # fsdp); an EMA copy in float32 (sharded alike).
        trained_role(cfg, Training(policy, "lm", n, [(mb, seq, "logprobs", True), *ptx], 2, 1, ema=True,
                                   scoring_rows=scoring_rows, scoring_seq=seq),
                     "learner", specs["learner"].title, n, group[0], group[1],
                     "ppo.micro_batch_size" + (" or ppo.ptx_micro_batch_size" if ptx else "")),
        # The critic (initialised from the RM): .grad plus the flat buckets, as the policy.
        trained_role(cfg, Training(value, "scalar", n, [(mb, seq, "scalar", True)], 2, 1,
                                   scoring_rows=scoring_rows, scoring_seq=seq),
                     "critic", specs["critic"].title, n, *group),
    ]
    # Frozen scorers hold their model in model.dtype: the reward model whole on one GPU, the
    # reference over ppo.num_reference_scorers (sharded: 1/k each plus the gathered root and two
    # blocks); each scores its share of the batch SCORING_ROWS rows at a time.
    for role, shape, head in (("reward", value, "scalar"), ("reference", policy, "lm")):
        k = specs[role].count
        keeps_kv = head == "lm" and CAUSAL_LM_FORWARD_KEEPS_KV
        rows = min(SCORING_ROWS, -(-p.batch_size // k))
        w = c * shape.params(head) / k + (c * (shape.root_params(head) + 2 * shape.block_params()) if k > 1 else 0)
        act = mm.inference_bytes(shape, rows, seq, c, head, keeps_kv)
        if role == "reference":
            hint = "raise ppo.num_reference_scorers (ranks the reference is sharded over)" \
                + (", or model.dtype=bfloat16" if c == mm.FP32 else "")
            blame = "model.dtype" if c == mm.FP32 else "ppo.num_reference_scorers"
        else:
            hint = (f"the reward model is held whole on one GPU and scores {rows} rows at a time"
                    + (": model.dtype=bfloat16" if c == mm.FP32 else ": a smaller model"))
            blame = "model.dtype" if c == mm.FP32 else "model.reward" if m.reward else "model.policy"
        roles.append(RoleMemory(role, specs[role].title, k, w, 0.0, 0.0, act, 0.0, runtime, "score",
                                hint, blame, {"score": w + act + runtime, "idle": w + runtime}))
    roles.append(generator_role(cfg, policy, specs["generator"].count, specs["generator"].title))
    return roles


def learner_pieces(cfg: Config) -> tuple[int, int]:
    """(episodes, ptx rows) in a policy learner rank's largest forward/backward: its share of a
    minibatch (at least one episode) cut by `ppo.micro_batch_size`, its ptx rows by
    `ppo.ptx_micro_batch_size` or into as many pieces as its episodes (actors/policy_learner.py)."""
    p = cfg.ppo
    share = -(-p.minibatch_size // p.num_learners)
    mb = min(p.micro_batch_size or share, share)
    if not (p.ptx_coef and p.ptx_ratio):
        return mb, 0
    ptx_share = -(-p.ptx_ratio * p.minibatch_size // p.num_learners)
    per_piece = p.ptx_micro_batch_size or -(-ptx_share // -(-share // mb))
    return mb, min(per_piece, ptx_share)


def learner_scoring_rows(cfg: Config) -> int:
    """Each learner rank scores its share of the batch, `SCORING_ROWS` rows at a time."""
    return min(SCORING_ROWS, -(-cfg.ppo.batch_size // cfg.ppo.num_learners))


def generator_role(cfg: Config, shape: mm.ModelShape, count: int, title: str) -> RoleMemory:
    """A generator's share of the batch: weights split over its tensor-parallel GPUs, the KV
    cache of its rows' prompt+response tokens (at most the generation budget at once).

    vLLM (not colocated) reserves `VLLM_GPU_MEMORY_UTILIZATION` of the GPU and gives the KV
    cache whatever its weights and profiling leave; that must hold one whole sequence."""
    p, m, r = cfg.ppo, cfg.model, cfg.resources
    tp = r.gpus_per_generator if r.num_gpus else 1
    c = mm.dtype_bytes(m.dtype)
    seq = m.max_prompt_tokens + m.max_response_tokens
    rows = -(-p.batch_size // count)
    tokens = min(rows * seq, max(p.generation_token_budget, seq))
    kv_need = tokens * mm.kv_bytes_per_token(shape, c) / tp
    w = c * shape.params("lm") / tp
    # One forward's working tensors over the tokens in flight, logits of one row per sequence.
    act = (c * min(tokens, 8192) * shape.hidden * 16 / tp
           + min(rows, 256) * shape.vocab * 2 * mm.FP32)
    runtime = mm.CUDA_RUNTIME_BYTES if r.num_gpus else 0.0
    hint = "raise resources.gpus_per_generator (tensor parallel), or model.dtype=bfloat16"
    if p.engine == "vllm" and not r.colocate and r.num_gpus:
        reserved = VLLM_GPU_MEMORY_UTILIZATION * r.gpu_memory_gb * mm.GB
        kv = reserved - w - act - runtime
        one_sequence = seq * mm.kv_bytes_per_token(shape, c) / tp
        if kv < one_sequence:  # vLLM refuses to start without room for one max_model_len sequence
            kv = one_sequence
        return RoleMemory("generator", title, count * tp, w, 0.0, 0.0, act, kv, runtime, "generate", hint,
                          "resources.gpus_per_generator",
                          {"generate": w + act + kv + runtime, "idle": w + kv + runtime})
    # Colocated, a generator sleeps between generations (weights and KV cache released).
    return RoleMemory("generator", title, count * tp, w, 0.0, 0.0, act, kv_need, runtime, "generate", hint,
                      "resources.gpus_per_generator", {"generate": w + act + kv_need + runtime, "idle": runtime})


def colocated_phases(roles: list[RoleMemory]) -> dict[str, float]:
    """Bytes on a GPU holding one of every PPO role (one rank of each group), per phase.

    Learner and critic state stays on the GPU throughout; the generators sleep except
    while they generate; the four scorings run at once; policy and critic train together."""
    by = {r.role: r for r in roles if r.role in PPO_ROLES}

    def on_gpu(phase: str) -> float:
        # A learner's optimizer step follows its backward: its worse moment counts as "train".
        get = (lambda r: max(r.at.get("train", r.at["idle"]), r.at.get("step", r.at["idle"]))) \
            if phase == "train" else (lambda r: r.at.get(phase, r.at["idle"]))
        return sum(get(r) for r in by.values())
    return {phase: on_gpu(phase) for phase in ("generate", "score", "train")}


# ---------------------------------------------------------------- the stages

def stage_roles(cfg: Config, policy: mm.ModelShape, value: mm.ModelShape) -> list[RoleMemory]:
    """The Ray Train stages, one GPU per worker, each stage alone on the cluster."""
    m, out = cfg.model, []
    ddp_grads = lambda n: 2 if cfg.resources.strategy == "ddp" and n > 1 else 1  # noqa: E731 .grad + DDP's buckets
    for stage, title in (("pretrain", "pretrain trainer"), ("sft", "SFT trainer"),
                         ("ppo_init_sft", "PPO-init SFT trainer"), ("rm", "RM trainer")):
        sc = getattr(cfg, stage)
        if not sc.enabled:
            continue
        n = sc.num_workers
        mb = sc.micro_batch_size or max(1, sc.batch_size // n)  # more workers than examples: one each
        if stage == "pretrain":
            passes, shape, head, dropout = [(mb, sc.seq_len, "lm", False)], policy, "lm", False
        elif stage == "rm":
            # One packed row per prompt: the prompt once, then all K completions.
            row = m.max_prompt_tokens + cfg.data.synthetic.k_max * m.max_response_tokens
            passes, shape, head, dropout = [(mb, row, "scalar", True)], value, "scalar", False
        else:
            seq = max(m.max_prompt_tokens + m.max_response_tokens,
                      cfg.ptx_block_tokens if sc.ptx_fraction else 0)
            passes, shape, head, dropout = [(mb, seq, "lm", True)], policy, "lm", sc.resid_pdrop > 0
        out.append(trained_role(cfg, Training(shape, head, n, passes, ddp_grads(n), 0, dropout=dropout),
                                stage, title, n, f"{stage} workers", f"{stage}.num_workers",
                                f"{stage}.micro_batch_size"))
    return out


def memory_plan(cfg: Config) -> MemoryPlan:
    """Every role's bytes per GPU against `resources.gpu_memory_gb`."""
    capacity = cfg.resources.gpu_memory_gb * mm.GB
    policy, value = model_shape(cfg, "policy"), model_shape(cfg, "reward")
    unknown = [name for name, s in ((cfg.model.policy, policy), (cfg.model.reward or cfg.model.policy, value))
               if s is None]
    if unknown:
        return MemoryPlan(capacity, [], None, sorted(set(unknown)))
    roles = (ppo_roles(cfg, policy, value) if cfg.ppo.enabled else []) + stage_roles(cfg, policy, value)
    colocated = colocated_phases(roles) if cfg.resources.colocate and cfg.ppo.enabled else None
    return MemoryPlan(capacity, roles, colocated)


def check_memory(cfg: Config) -> list[tuple[str, str]]:
    """(field, message) for each role over its GPU; nothing on CPU runs (no GPU budget)."""
    if not cfg.resources.num_gpus:
        return []
    return memory_plan(cfg).problems()

"""One typed config for every stage, loaded from YAML with `key.sub=value` overrides.

Errors are `ConfigError`s whose message is one line per problem naming the file,
the field and the value, e.g.
`configs/tiny.yaml: ppo.minibatch_size = 48: ppo.batch_size (512) must be divisible by it`.
Field checks are pydantic's; geometry checks that involve several fields live in
`check_geometry` so each names the field a user should change. Values the schema
accepts but training does not implement yet are refused by `check_trainable`
where a training command starts (eval and serve, and `--dry-run`, still load them).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from rlhf.data.formats import DISK_FIELDS

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "configs"
DEFAULT_PRESET = PRESETS_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A config problem; str() is one line per problem, each naming the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute(path: str) -> str:
    """`path` made absolute against the driver's working directory.

    Ray workers (Ray Train's above all) run in other directories, so a relative
    path read there would point elsewhere.
    """
    return str(Path(path).expanduser().absolute())


def _absolute_if_local(path: str | None) -> str | None:
    """Absolute if `path` exists here; else left alone ("tiny", a hub name, or a
    missing file that `check_files` reports by the name the user gave)."""
    return _absolute(path) if path is not None and Path(path).expanduser().exists() else path


class RunConfig(_Section):
    output_dir: str = "runs/tiny"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Weights & Biases beside TensorBoard (the wandb extra); offline writes <run>/wandb/ for `wandb sync`.
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "instructray"

    @field_validator("output_dir")
    @classmethod
    def _output_dir_absolute(cls, v: str) -> str:
        return _absolute(v)


class TinyModelConfig(_Section):
    """Shape of the factory-built GPT-2 used when `model.policy` is "tiny"."""
    vocab_size: int = Field(1024, ge=300)
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    n_positions: int | None = Field(None, ge=16)  # None = model.context_length


class ModelConfig(_Section):
    # "tiny": built locally by rlhf.tiny in stage 0. Otherwise an HF directory
    # (or a hub name, for users who are online).
    policy: str = "tiny"
    # Base for the reward model; null = initialise it from the SFT model (the
    # paper reports SFT init gives results similar to a fine-tuned GPT-3 init).
    reward: str | None = None
    tiny: TinyModelConfig = TinyModelConfig()
    # Eval and serve load models in this dtype. Training keeps float32 master weights and Adam
    # state and computes in this dtype (bf16/fp16 mixed precision; fp16 with a loss scaler).
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    context_length: int = Field(2048, ge=16)
    max_prompt_tokens: int = Field(1024, ge=1)
    max_response_tokens: int = Field(1024, ge=1)

    @field_validator("policy", "reward")
    @classmethod
    def _paths_absolute(cls, v: str | None) -> str | None:
        return v if v == "tiny" else _absolute_if_local(v)


class OptimizerConfig(_Section):
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)


class SyntheticDataConfig(_Section):
    seed: int = 0
    labeler_agreement: float = Field(0.73, gt=0.5, le=1.0)  # between two labelers (rlhf.synthetic.labeler)
    demo_noise: float = Field(0.3, ge=0, le=1)
    families: list[str] | None = None
    num_demonstrations: int = Field(2000, ge=1)
    num_comparisons: int = Field(1000, ge=1)
    # Rankings of the SFT policy's own T=1 samples (the paper's comparison data), made when
    # the RM stage starts and trained on beside the num_comparisons rankings of made-up mistakes.
    policy_comparisons: int = Field(0, ge=0)
    # Share of training candidates that run on past the response limit (held-out rankings have none).
    run_on_prob: float = Field(0.0, ge=0, le=0.9)
    k_min: int = Field(4, ge=2, le=9)
    k_max: int = Field(9, ge=2, le=9)
    num_prompts: int = Field(31000, ge=1)
    num_pretrain_docs: int = Field(5000, ge=1)
    num_eval_prompts: int = Field(200, ge=1)
    # Held-out rankings for the RM's accuracy; None = num_eval_prompts.
    num_eval_comparisons: int | None = Field(None, ge=1)


class DataConfig(_Section):
    source: Literal["synthetic", "files", "public"] = "synthetic"
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    # For source "files": per kind, our field -> the source's column, e.g. a hub set's
    # {demonstrations: {prompt: instruction}}; unmapped fields keep their names.
    columns: dict[Literal["demonstrations", "comparisons", "prompts", "pretrain_text"], dict[str, str]] = {}
    # For source "public": a folder holding the public sets in their own files (docs/data_formats.md).
    public_root: str | None = None
    # For source "files": local JSON/JSONL/CSV/parquet or hub names (docs/data_formats.md).
    demonstrations: str | None = None
    comparisons: str | None = None
    prompts: str | None = None
    pretrain_text: str | None = None

    @field_validator("demonstrations", "comparisons", "prompts", "pretrain_text")
    @classmethod
    def _paths_absolute(cls, v: str | None) -> str | None:
        return _absolute_if_local(v)

    @field_validator("public_root")
    @classmethod
    def _root_absolute(cls, v: str | None) -> str | None:
        return None if v is None else _absolute(v)


class PretrainConfig(_Section):
    """Stage 0: causal-LM pretraining of the tiny base model (tiny only)."""
    enabled: bool = False
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    seq_len: int = Field(128, ge=8)
    lr: float = Field(1e-3, gt=0)
    final_lr_fraction: float = Field(0.1, ge=0, le=1)
    num_workers: int = Field(1, ge=1)
    # Sequences per forward/backward on one worker (gradient accumulation); None = its whole share.
    micro_batch_size: int | None = Field(None, ge=1)


class SFTConfig(_Section):
    enabled: bool = True
    epochs: int = Field(16, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(9.65e-6, gt=0)
    final_lr_fraction: float = Field(0.1, ge=0, le=1)
    resid_pdrop: float = Field(0.2, ge=0, lt=1)
    # Fraction of each batch drawn from pretraining text (the PPO-init SFT uses 10%).
    ptx_fraction: float = Field(0.0, ge=0, lt=1)
    # Paper: the final SFT model is chosen by RM score on a validation set.
    select_by_rm: bool = True
    num_workers: int = Field(1, ge=1)
    # Examples per forward/backward on one worker (gradient accumulation); None = its whole share.
    micro_batch_size: int | None = Field(None, ge=1)


class RMConfig(_Section):
    enabled: bool = True
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)  # prompts per batch, each with its K completions
    lr: float = Field(9e-6, gt=0)
    final_lr_fraction: float = Field(0.1, ge=0, le=1)
    normalize: bool = True  # bias so labeler demonstrations score 0 on average
    # Blocks added to the initial model before training, each starting as the identity
    # (rlhf.deepen): an RM (and value model) deeper than the policy without a second pretraining.
    added_layers: int = Field(0, ge=0)
    num_workers: int = Field(1, ge=1)
    # Prompts (each with its K completions) per forward/backward on one worker; None = its whole share.
    micro_batch_size: int | None = Field(None, ge=1)


class PPOConfig(_Section):
    enabled: bool = True
    episodes: int = Field(256_000, ge=1)
    batch_size: int = Field(512, ge=1)
    minibatch_size: int = Field(64, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    lr: float = Field(9.65e-6, gt=0)
    critic_lr: float = Field(9e-6, gt=0)
    warmup_iterations: int = Field(10, ge=0)
    warmup_start_fraction: float = Field(0.1, gt=0, le=1)
    ema_decay: float = Field(0.992, ge=0, lt=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_ratio: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.02, ge=0)
    ptx_coef: float = Field(27.8, ge=0)  # 0 = plain PPO (the paper's "PPO")
    ptx_ratio: int = Field(8, ge=0)  # pretraining examples per RL episode
    ptx_seq_len: int | None = Field(None, ge=8)  # tokens per pretraining example; None = context
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # Also train plain PPO (ptx_coef=0) for the report's PPO vs PPO-ptx comparison.
    compare_ptx: bool = True
    engine: Literal["hf", "vllm"] = "hf"
    num_generators: int = Field(1, ge=1)
    num_learners: int = Field(1, ge=1)
    # Ranks the frozen reference policy is sharded over (FSDP2, each scoring its share of a
    # batch); more than 1 needs resources.strategy fsdp. A paper-size policy fits no one GPU.
    num_reference_scorers: int = Field(1, ge=1)
    # Episodes per forward/backward on one learner rank (gradient accumulation within a
    # minibatch; its ptx rows split alike); None = the rank's whole share of the minibatch.
    micro_batch_size: int | None = Field(None, ge=1)
    # Pretraining rows per forward/backward on one learner rank; None = as many pieces as
    # its episodes take (micro_batch_size). Long ptx rows are a rank's largest activations.
    ptx_micro_batch_size: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    # Sample the next batch while the learners train on this one (off by default: the paper is
    # synchronous). The learners then train on rollouts up to max_staleness weight versions old
    # (that many batches in flight), corrected by the decoupled PPO objective (rlhf/off_policy.py)
    # whose behaviour weights pi_proximal / pi_behaviour are truncated at behaviour_weight_cap.
    async_rollouts: bool = False
    max_staleness: int = Field(1, ge=1)
    behaviour_weight_cap: float = Field(2.0, ge=1)
    max_restarts: int = Field(3, ge=0)
    max_nonfinite_steps: int = Field(3, ge=1)
    # Bound on prompt+response tokens per generation call (out-of-memory guard).
    generation_token_budget: int = Field(65536, ge=1)
    # Held-out prompts sampled each iteration (fixed prompts, fixed seed) to score with the
    # gold labeler: the training batch's gold score swings with its prompt mix, this one does
    # not. Synthetic task only; 0 = off.
    probe_prompts: int = Field(0, ge=0)


class ResourcesConfig(_Section):
    num_cpus: float | None = Field(None, gt=0)  # None = what Ray sees
    num_gpus: int = Field(0, ge=0)
    gpus_per_generator: int = Field(1, ge=1)  # tensor parallel size of one vLLM engine
    # Every PPO role in one placement group sharing the same devices (rlhf/placement.py); the
    # generators free their GPU memory while the learners train.
    colocate: bool = False
    # How every learner group (PPO policy and critic, stages 0-2) splits its state: "ddp" keeps a
    # full replica per rank, "fsdp" shards weights, gradients and Adam state (FSDP2, per block).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Recompute each transformer block's activations in backward instead of keeping them.
    activation_checkpointing: bool = False
    # Memory of one GPU; loading and --dry-run refuse a layout whose plan (rlhf.memory_plan) exceeds it.
    gpu_memory_gb: float = Field(80.0, gt=0)
    # Custom Ray resources each PPO actor of a role asks for, e.g. {generator: {rollout_node: 0.01}}
    # to keep the generators on nodes started with `--resources '{"rollout_node": 1}'`. A lost
    # actor waits, logging what it needs, until a node offering them is up again.
    role_resources: dict[Literal["generator", "reward", "reference", "critic", "learner"],
                         dict[str, float]] = Field(default_factory=dict)

    @field_validator("role_resources")
    @classmethod
    def _custom_only(cls, v: dict) -> dict:
        for role, res in v.items():
            for name, amount in res.items():
                if name in ("CPU", "GPU", "memory", "object_store_memory") or amount <= 0:
                    raise ValueError(f"{role}: {name}={amount}: name custom resources with amounts > 0 "
                                     "(CPU and GPU shares are the placement's)")
        return v


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None  # or env INSTRUCTRAY_API_KEY; never written to the run folder
    # Listen beyond loopback with no API key: refused unless this says it is meant.
    allow_unauthenticated: bool = False
    num_replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_tokens_limit: int = Field(256, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    # Admission: a replica works on at most max_ongoing_requests at once (its decoding batches
    # take max_batch_size of them); each HTTP proxy holds at most max_queued_requests more; the
    # rest are answered 503 with `Retry-After: retry_after_s` at once, not queued without bound.
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(32, ge=1)
    retry_after_s: int = Field(1, ge=0)


class EvalConfig(_Section):
    num_prompts: int = Field(200, ge=1)
    num_pretrain_docs: int = Field(200, ge=1)
    # Independent responses per prompt; intervals still resample whole prompts.
    samples_per_prompt: int = Field(1, ge=1)
    # TruthfulQA.csv: adds MC1/MC2 accuracy of every policy, through lm-evaluation-harness (the eval extra).
    truthfulqa: str | None = None
    truthfulqa_limit: int | None = Field(None, ge=1)  # only the first N questions

    @field_validator("truthfulqa")
    @classmethod
    def _truthfulqa_absolute(cls, v: str | None) -> str | None:
        return None if v is None else _absolute(v)


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    sft: SFTConfig = SFTConfig()
    ppo_init_sft: SFTConfig = SFTConfig(
        enabled=False, epochs=2, lr=5e-6, ptx_fraction=0.1, select_by_rm=False)
    rm: RMConfig = RMConfig()
    ppo: PPOConfig = PPOConfig()
    resources: ResourcesConfig = ResourcesConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    # Where this config was loaded from (for messages); not a user field.
    source: str = Field("<defaults>", exclude=True)
    # Dotted keys set on the command line, so later checks blame the command line, not the file.
    _overridden: set[str] = PrivateAttr(default_factory=set)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    @property
    def ptx_block_tokens(self) -> int:
        """Tokens per pretraining example wherever policy training mixes them in (SFT, ptx, eval)."""
        return self.ppo.ptx_seq_len or self.model.context_length

    @property
    def ppo_iterations(self) -> int:
        return self.ppo.episodes // self.ppo.batch_size

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.dump_without_secrets(), sort_keys=False)

    def dump_without_secrets(self) -> dict:
        """The config as plain data for files and trackers: the API key stays in memory only."""
        out = self.model_dump(mode="json")
        out["serve"]["api_key"] = None
        return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`ppo.kl_coef=0.05` -> ("ppo.kl_coef", 0.05); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e})") from None
    return key, value


def _lookup(tree: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return "<missing>"
    return tree


def _format_errors(err: ValidationError, raw: dict, source: str, overridden: set[str]) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        origin = "command line" if field in overridden else source
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: {field}: unknown key")
            continue
        value = _lookup(raw, tuple(e["loc"]))
        lines.append(f"{origin}: {field} = {value!r}: {e['msg']}")
    return "\n".join(lines)


def resolve_preset(path: str | Path | None) -> Path:
    """A path as given, or a preset name such as "tiny" / "instructgpt-1.3b"."""
    if path is None:
        return DEFAULT_PRESET
    p = Path(path)
    if p.exists():
        return p
    for candidate in (PRESETS_DIR / p, PRESETS_DIR / f"{p}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"{path}: config file not found (presets: "
                      f"{', '.join(sorted(q.stem for q in PRESETS_DIR.glob('*.yaml')))})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = False) -> Config:
    """Load a preset or YAML file, apply overrides, validate fields and geometry."""
    file = resolve_preset(path)
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: top level must be a mapping of sections")
    overridden = set()
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
        overridden.add(key)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, raw, str(file), overridden)) from None
    cfg.source = str(file)
    cfg._overridden = overridden
    problems = check_geometry(cfg, check_files=check_files)
    if problems:
        raise ConfigError(format_problems(cfg, problems))
    return cfg


def format_problems(cfg: Config, problems: list[tuple[str, str]]) -> str:
    """One line per (field, message): `<file or command line>: field = value: message`."""
    return "\n".join(
        f"{'command line' if field in cfg._overridden else cfg.source}: {field} = "
        f"{_field_value(cfg, field)!r}: {msg}" for field, msg in problems)


def _field_value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def check_geometry(cfg: Config, check_files: bool = True) -> list[tuple[str, str]]:
    """Checks across fields; each problem names the field to change."""
    p: list[tuple[str, str]] = []
    ppo, m = cfg.ppo, cfg.model
    if ppo.batch_size % ppo.minibatch_size:
        p.append(("ppo.minibatch_size", f"ppo.batch_size ({ppo.batch_size}) must be divisible by it"))
    fsdp = cfg.resources.strategy == "fsdp"
    # Under fsdp a group may have more ranks than rows, to shard a model over more GPUs: the
    # ranks without a row run throwaway forwards, as sharded forwards are collectives.
    if ppo.minibatch_size % ppo.num_learners and not (fsdp and ppo.num_learners > ppo.minibatch_size):
        p.append(("ppo.num_learners", f"ppo.minibatch_size ({ppo.minibatch_size}) must be divisible by it"
                  + ("" if fsdp else " (more ranks than episodes need resources.strategy: fsdp)")))
    if ppo.num_reference_scorers > 1 and not fsdp:
        p.append(("ppo.num_reference_scorers", "sharding the reference needs resources.strategy: fsdp"))
    if ppo.ptx_micro_batch_size is not None and not (ppo.ptx_coef and ppo.ptx_ratio):
        p.append(("ppo.ptx_micro_batch_size", "only read with ptx rows (ppo.ptx_coef and ppo.ptx_ratio > 0)"))
    if ppo.episodes < ppo.batch_size:
        p.append(("ppo.episodes", f"fewer than one batch of {ppo.batch_size} episodes"))
    if m.max_prompt_tokens + m.max_response_tokens > m.context_length:
        p.append(("model.max_response_tokens",
                  f"prompt ({m.max_prompt_tokens}) + response tokens exceed the context ({m.context_length})"))
    if m.policy == "tiny" and m.tiny.n_positions and m.context_length > m.tiny.n_positions:
        p.append(("model.context_length", f"exceeds the tiny model's n_positions ({m.tiny.n_positions})"))
    if m.policy == "tiny" and m.tiny.n_embd % m.tiny.n_head:
        p.append(("model.tiny.n_head", f"model.tiny.n_embd ({m.tiny.n_embd}) must be divisible by it"))
    if cfg.resources.num_gpus:
        from rlhf.placement import actor_specs, gpus_needed  # placement reads Config: imported late
        need = gpus_needed(cfg)
        if need > cfg.resources.num_gpus:
            roles = ", ".join(f"{s.title} {s.total_gpus:g}" for s in actor_specs(cfg, total_cpus=1.0))
            p.append(("resources.num_gpus", f"the PPO actor groups need {need} GPUs ({roles}"
                      f"{'; colocated, the largest sets the count' if cfg.resources.colocate else ''}): "
                      "add GPUs or reduce the groups"))
    syn = cfg.data.synthetic
    if syn.k_min > syn.k_max:
        p.append(("data.synthetic.k_min", f"greater than data.synthetic.k_max ({syn.k_max})"))
    for stage in ("sft", "ppo_init_sft", "rm", "pretrain"):
        sc = getattr(cfg, stage)
        spread = fsdp and stage in ("sft", "ppo_init_sft") and sc.num_workers > sc.batch_size
        if sc.batch_size % sc.num_workers and not spread:
            p.append((f"{stage}.num_workers", f"{stage}.batch_size ({sc.batch_size}) must be divisible by it"
                      + (" (more SFT workers than examples need resources.strategy: fsdp)"
                         if stage in ("sft", "ppo_init_sft") else "")))
        elif sc.micro_batch_size and (sc.batch_size // sc.num_workers) % sc.micro_batch_size:
            p.append((f"{stage}.micro_batch_size", f"must divide a worker's share of {stage}.batch_size "
                      f"({sc.batch_size // sc.num_workers})"))
    if ppo.micro_batch_size and not ppo.minibatch_size % ppo.num_learners \
            and (ppo.minibatch_size // ppo.num_learners) % ppo.micro_batch_size:
        p.append(("ppo.micro_batch_size", f"must divide a learner's share of ppo.minibatch_size "
                  f"({ppo.minibatch_size // ppo.num_learners})"))
    if ppo.engine == "vllm" and cfg.run.device == "cpu":
        p.append(("ppo.engine", "vllm needs GPUs; use engine hf on the CPU"))
    if cfg.data.source == "files":
        for field in ("demonstrations", "comparisons", "prompts", "pretrain_text"):
            value = getattr(cfg.data, field)
            if value is None:
                p.append((f"data.{field}", "required when data.source is files"))
            elif check_files and _looks_local(value) and not Path(value).exists():
                p.append((f"data.{field}", f"file not found: {value}"))
    for kind, mapping in cfg.data.columns.items():
        if cfg.data.source != "files":
            p.append((f"data.columns.{kind}", "only read when data.source is files"))
        known = DISK_FIELDS["text" if kind == "pretrain_text" else kind]
        for ours in mapping:
            if ours not in known:
                p.append((f"data.columns.{kind}", f"{ours!r} is not a field of {kind} ({', '.join(known)})"))
    if cfg.data.source == "public":
        from rlhf.data.public import missing_public_files  # the layout lives with its reader
        if check_files and cfg.data.public_root is None:  # the preset itself leaves it to the command line
            p.append(("data.public_root", "required when data.source is public: the folder of the public sets"))
        elif check_files and (missing := missing_public_files(cfg.data.public_root)):
            p.append(("data.public_root", f"missing {', '.join(missing)}"))
    # Settings that only their feature reads: set without it, they would be accepted and ignored.
    if cfg.data.public_root is not None and cfg.data.source != "public":
        p.append(("data.public_root", "only read when data.source is public"))
    if cfg.eval.truthfulqa_limit is not None and not cfg.eval.truthfulqa:
        p.append(("eval.truthfulqa_limit", "only read with eval.truthfulqa (the TruthfulQA CSV)"))
    for field in ("max_staleness", "behaviour_weight_cap"):
        if not cfg.ppo.async_rollouts and getattr(cfg.ppo, field) != PPOConfig.model_fields[field].default:
            p.append((f"ppo.{field}", "only read with ppo.async_rollouts: true"))
    if cfg.run.wandb == "off" and cfg.run.wandb_project != RunConfig().wandb_project:
        p.append(("run.wandb_project", "only read when run.wandb is offline or online"))
    if check_files and cfg.run.wandb != "off" and importlib.util.find_spec("wandb") is None:
        p.append(("run.wandb", "needs the wandb package: pip install -e '.[wandb]'"))
    if check_files and cfg.eval.truthfulqa:
        if not Path(cfg.eval.truthfulqa).exists():
            p.append(("eval.truthfulqa", f"file not found: {cfg.eval.truthfulqa}"))
        if importlib.util.find_spec("lm_eval") is None:  # before a run trains for an hour, not after
            p.append(("eval.truthfulqa", "needs lm-evaluation-harness: pip install -e '.[eval]'"))
    return p


def check_trainable(cfg: Config) -> list[tuple[str, str]]:
    """Values the schema accepts but the training stages do not implement yet.

    Refused where pretrain/sft/rm/ppo/run start rather than at load, so the paper
    presets' plans still print and eval/serve (which do honour `model.dtype`) still run.
    """
    p: list[tuple[str, str]] = []
    if cfg.resources.colocate:
        from rlhf.placement import colocation_problems  # placement reads Config: imported late
        p += colocation_problems(cfg)
    if cfg.ppo.async_rollouts and cfg.resources.colocate:
        p.append(("ppo.async_rollouts", "not implemented with resources.colocate: colocated generators "
                  "free their memory while the learners train, so they cannot sample ahead"))
    if cfg.resources.role_resources and cfg.resources.colocate:
        p.append(("resources.role_resources", "not implemented with resources.colocate: colocated roles "
                  "share one placement group's bundles, which ask for CPU and GPU only"))
    if cfg.ppo.async_rollouts and cfg.ppo.engine == "vllm":
        p.append(("ppo.async_rollouts", "not implemented with engine vllm: its NCCL weight broadcast "
                  "needs idle generators, and sampling ahead keeps them busy; use engine hf"))
    if cfg.resources.num_gpus:  # load already checked there are enough GPUs; do their bytes fit?
        from rlhf.memory_plan import check_memory  # reads Config: imported late
        p += check_memory(cfg)  # each role's bytes per GPU against resources.gpu_memory_gb (--dry-run)
    return p


def require_trainable(cfg: Config) -> None:
    """Raise ConfigError naming each field `check_trainable` refuses."""
    problems = check_trainable(cfg)
    if problems:
        raise ConfigError(format_problems(cfg, problems))


def _looks_local(value: str) -> bool:
    """Hub names look like `org/name`; local files have a known suffix or exist."""
    return Path(value).suffix in {".json", ".jsonl", ".csv", ".parquet", ".gz", ".txt"} \
        or value.startswith((".", "/"))

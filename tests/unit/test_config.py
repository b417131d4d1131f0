"""Config: presets load, overrides apply, and each kind of mistake gives one line naming the field."""
import re
from pathlib import Path

import pytest

from orchestration import cli, pipeline
from orchestration.cli import TRAINING_COMMANDS
from rlhf.config import PRESETS_DIR, ConfigError, check_trainable, load_config, parse_override, require_trainable

PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))


def test_presets_are_found():
    assert {p.stem for p in PRESETS} >= {"tiny", "instructgpt-1.3b", "instructgpt-6b", "instructgpt-175b"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_each_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.ppo.batch_size % cfg.ppo.minibatch_size == 0
    assert cfg.source == str(preset)


@pytest.mark.parametrize("size", ["1.3b", "6b", "175b"])
def test_paper_presets_carry_appendix_c(size):
    cfg = load_config(f"instructgpt-{size}")
    sft_lr, sft_bs = {"1.3b": (9.65e-6, 32), "6b": (9.65e-6, 32), "175b": (5.03e-6, 8)}[size]
    init_lr = {"1.3b": 5e-6, "6b": 1.04e-5, "175b": 2.45e-6}[size]
    critic_lr = {"1.3b": 9e-6, "6b": 9e-6, "175b": 5e-6}[size]
    assert (cfg.sft.epochs, cfg.sft.lr, cfg.sft.batch_size, cfg.sft.resid_pdrop) == (16, sft_lr, sft_bs, 0.2)
    assert cfg.sft.final_lr_fraction == 0.1
    assert (cfg.ppo_init_sft.epochs, cfg.ppo_init_sft.lr, cfg.ppo_init_sft.ptx_fraction) == (2, init_lr, 0.1)
    assert (cfg.rm.epochs, cfg.rm.lr, cfg.rm.batch_size) == (1, 9e-6, 64)
    p = cfg.ppo
    assert (p.episodes, p.batch_size, p.minibatch_size, p.ppo_epochs) == (256_000, 512, 64, 1)
    assert (p.ema_decay, p.gamma, p.clip_ratio, p.kl_coef, p.temperature) == (0.992, 1.0, 0.2, 0.02, 1.0)
    assert (p.ptx_coef, p.ptx_ratio, p.warmup_iterations, p.warmup_start_fraction) == (27.8, 8, 10, 0.1)
    assert p.critic_lr == critic_lr
    assert (cfg.optimizer.beta1, cfg.optimizer.beta2) == (0.9, 0.95)
    assert (cfg.model.context_length, cfg.model.max_prompt_tokens, cfg.model.max_response_tokens) == (2048, 1024, 1024)


def _commented_keys(text: str) -> dict[tuple[str, str], str]:
    """(section, key) -> the comment on that line, for the block-style YAML of tiny.yaml."""
    out, section = {}, None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":")[0]
        elif line.startswith("  ") and not line.startswith("   ") and ":" in line:
            key = line.strip().split(":")[0]
            out[(section, key)] = line.split("#", 1)[1] if "#" in line else ""
    return out


def test_tiny_deviations_are_commented():
    """Every tiny value that differs from the 1.3B preset says why ("deviation:")."""
    comments = _commented_keys((PRESETS_DIR / "tiny.yaml").read_text())
    paper = load_config("instructgpt-1.3b").model_dump()
    tiny = load_config("tiny").model_dump()
    uncommented = [
        f"{section}.{key}"
        for section in ("model", "sft", "rm", "ppo", "optimizer")
        for key, value in tiny[section].items()
        # Resource layout (how many workers, how big a forward) is the machine's, not the recipe's.
        if value != paper[section][key] and key not in {"engine", "num_generators", "num_learners", "num_workers",
                                                        "micro_batch_size", "checkpoint_every", "tiny", "policy"}
        and "deviation" not in comments.get((section, key), "")
    ]
    assert not uncommented, f"tiny.yaml deviations without a 'deviation:' comment: {uncommented}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_comments_are_one_line_each(preset):
    """A reason that needs a second line is history: it belongs in docs/experiments.md."""
    lines = preset.read_text().splitlines()
    for previous, line in zip([""] + lines, lines):
        if line.lstrip().startswith("#"):
            assert "#" not in previous, f"{preset.name}: a comment runs on into {line.strip()!r}"
    too_long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not too_long, f"{preset.name}: lines over 120 characters: {too_long}"


def test_overrides_apply_with_yaml_types():
    cfg = load_config("tiny", ["ppo.kl_coef=0.03", "ppo.compare_ptx=false", "run.seed=3"])
    assert cfg.ppo.kl_coef == 0.03 and cfg.ppo.compare_ptx is False and cfg.run.seed == 3
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


@pytest.mark.parametrize("text, expected", [
    ("ppo:\n  minibatch_sise: 64\n", ["ppo.minibatch_sise", "unknown key"]),              # a typo
    ("ppo:\n  batch_size: lots\n", ["ppo.batch_size", "'lots'"]),                         # a wrong type
    ("ppo:\n  batch_size: 512\n  minibatch_size: 48\n", ["ppo.minibatch_size = 48", "512"]),  # geometry
])
def test_a_bad_value_gets_one_line_naming_field_value_and_file(tmp_path, text, expected):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    msg = _error(f)
    assert msg.count("\n") == 0
    assert str(f) in msg and all(e in msg for e in expected), msg


def test_override_errors_name_the_command_line():
    msg = _error("tiny", ["ppo.num_learners=3"])
    assert msg.startswith("command line: ppo.num_learners = 3")
    assert "unknown key" in _error("tiny", ["ppo.nope=1"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config("tiny", ["ppo.kl_coef"])


def test_missing_data_files_named_when_checked(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  source: files\n  demonstrations: nowhere/demos.jsonl\n"
                 "  comparisons: c.jsonl\n  prompts: p.jsonl\n  pretrain_text: t.jsonl\n")
    with pytest.raises(ConfigError, match=r"data\.demonstrations = 'nowhere/demos.jsonl': file not found"):
        load_config(f, check_files=True)
    load_config(f)  # not checked by default (e.g. --dry-run on a laptop)


def test_missing_config_file_is_clear():
    assert "config file not found" in _error(Path("no/such.yaml"))


def test_too_few_gpus_for_the_plan_names_the_field():
    msg = _error("instructgpt-1.3b", ["resources.num_gpus=8"])
    assert msg.startswith("command line: resources.num_gpus = 8") and "need 14 GPUs" in msg


def test_relative_paths_become_absolute_against_the_drivers_directory(tmp_path, monkeypatch):
    # Ray Train workers run in another directory: a relative path must not reach them.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demos.jsonl").write_text("")
    cfg = load_config("tiny", ["run.output_dir=runs/x", "data.demonstrations=demos.jsonl",
                               "data.prompts=hub-user/prompts"])
    assert cfg.output_dir == tmp_path / "runs" / "x"
    assert cfg.data.demonstrations == str(tmp_path / "demos.jsonl")
    assert cfg.data.prompts == "hub-user/prompts"  # not a local file: a hub name stays as given
    assert cfg.model.policy == "tiny"


# Asynchronous rollouts sample while the learners train; colocated generators sleep then.
NOT_IMPLEMENTED = {"ppo": {"async_rollouts": "true"}, "resources": {"colocate": "true"}}
FIELD = "ppo.async_rollouts = True"


def _not_implemented_yaml() -> str:
    return "".join(f"{section}:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items())
                   for section, fields in NOT_IMPLEMENTED.items())


def test_training_refuses_what_it_does_not_implement(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(_not_implemented_yaml())
    cfg = load_config(f)  # loads: eval, serve and --dry-run still take it
    assert check_trainable(load_config("tiny")) == []
    assert check_trainable(load_config("tiny", ["ppo.async_rollouts=true"])) == []  # alone it trains
    with pytest.raises(ConfigError) as e:
        require_trainable(cfg)
    assert str(e.value).count("\n") == 0 and str(e.value).startswith(f"{f}: {FIELD}: ")
    overrides = [f"{s}.{k}={v}" for s, fields in NOT_IMPLEMENTED.items() for k, v in fields.items()]
    with pytest.raises(ConfigError, match=rf"^command line: {re.escape(FIELD)}: "):
        require_trainable(load_config("tiny", overrides))


def test_training_commands_refuse_and_dry_run_shows_the_refusal(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\n" + _not_implemented_yaml())
    for command in TRAINING_COMMANDS:
        assert cli.main([command, str(f)]) == 2
        err = capsys.readouterr().err
        assert f"{f}: {FIELD}: not implemented" in err, command
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert cli.main(["run", str(f), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "PPO batch geometry" in out and f"  {f}: {FIELD}: not implemented" in out
    assert cli.main(["eval", str(f), "model.dtype=float16", "--dry-run"]) == 0
    assert "config error" not in capsys.readouterr().out  # eval does load models in model.dtype


def test_the_pipeline_refuses_before_it_writes_anything(tmp_path):
    cfg = load_config("tiny", [f"run.output_dir={tmp_path / 'run'}", "ppo.async_rollouts=true",
                               "resources.colocate=true"])
    with pytest.raises(ConfigError, match=rf"^command line: {re.escape(FIELD)}: not implemented"):
        pipeline.main(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["ppo.max_staleness=2", "ppo.behaviour_weight_cap=3"])
def test_async_settings_without_async_rollouts_are_refused(override):
    with pytest.raises(ConfigError, match=rf"{re.escape(override.split('=')[0])} = .*only read with "
                                          r"ppo.async_rollouts: true"):
        load_config("tiny", [override])
    load_config("tiny", [override, "ppo.async_rollouts=true"])


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_each_preset_prints_its_plan_and_is_trainable(preset, capsys):
    assert cli.main(["run", str(preset), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"config: {preset}" in out and "PPO batch geometry" in out and "config error" not in out
    assert check_trainable(load_config(preset)) == []


@pytest.mark.parametrize("overrides, field", [
    (["ppo.num_learners=64", "ppo.minibatch_size=32"], "ppo.num_learners"),       # ddp: ranks idle for nothing
    (["ppo.num_reference_scorers=2"], "ppo.num_reference_scorers"),
    (["sft.num_workers=16", "sft.batch_size=8"], "sft.num_workers"),
    (["rm.num_workers=16", "rm.batch_size=8", "resources.strategy=fsdp"], "rm.num_workers"),
    (["ppo.ptx_micro_batch_size=2", "ppo.ptx_coef=0"], "ppo.ptx_micro_batch_size"),
])
def test_sharding_wider_than_the_rows_needs_fsdp(overrides, field):
    """More ranks than rows, and a sharded reference, only under fsdp (SFT stages and PPO
    groups); ptx pieces only with ptx rows."""
    assert field in _error("tiny", overrides)
    if field != "ppo.ptx_micro_batch_size" and not field.startswith("rm."):
        load_config("tiny", overrides + ["resources.strategy=fsdp"])


def test_serve_takes_host_and_port_flags_like_other_servers(capsys):
    ns = cli._parser().parse_args(["serve", "runs/x", "--host", "0.0.0.0", "--port", "8123"])
    cfg = cli.resolve_config(ns)
    assert (cfg.serve.host, cfg.serve.port) == ("0.0.0.0", 8123)
    assert cli.main(["serve", "runs/x", "--port", "70000", "--dry-run"]) == 2
    assert "serve.port" in capsys.readouterr().err


@pytest.mark.parametrize("override, field", [
    ("data.public_root=/somewhere", "data.public_root"),
    ("eval.truthfulqa_limit=10", "eval.truthfulqa_limit"),
    ("run.wandb_project=mine", "run.wandb_project"),
])
def test_a_setting_without_its_feature_is_refused(override, field):
    with pytest.raises(ConfigError, match=rf"{re.escape(field)}.*only read"):
        load_config(None, [override])


def test_role_resources_name_custom_resources_of_known_roles():
    cfg = load_config("tiny", ["resources.role_resources={generator: {rollout_node: 0.01}}"])
    assert cfg.resources.role_resources == {"generator": {"rollout_node": 0.01}}
    assert "resources.role_resources" in _error("tiny", ["resources.role_resources={generator: {CPU: 1}}"])
    assert "'generator'" in _error("tiny", ["resources.role_resources={generater: {node: 1}}"])
    assert "amounts > 0" in _error("tiny", ["resources.role_resources={critic: {node: 0}}"])
    colocated = load_config("tiny", ["resources.role_resources={critic: {node: 1}}", "resources.colocate=true"])
    assert [f for f, _ in check_trainable(colocated)] == ["resources.role_resources"]

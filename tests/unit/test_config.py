"""Config: presets load, overrides apply, and each kind of mistake gives one line naming the field."""
from pathlib import Path

import pytest

from rlhf.config import PRESETS_DIR, ConfigError, load_config, parse_override

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
        if value != paper[section][key] and key not in {"engine", "num_generators", "num_learners",
                                                        "checkpoint_every", "tiny", "policy"}
        and "deviation" not in comments.get((section, key), "")
    ]
    assert not uncommented, f"tiny.yaml deviations without a 'deviation:' comment: {uncommented}"


def test_overrides_apply_with_yaml_types():
    cfg = load_config("tiny", ["ppo.kl_coef=0.05", "ppo.compare_ptx=false", "run.name=x"])
    assert cfg.ppo.kl_coef == 0.05 and cfg.ppo.compare_ptx is False and cfg.run.name == "x"
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def test_typo_key_names_field_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  minibatch_sise: 64\n")
    msg = _error(f)
    assert msg.count("\n") == 0
    assert str(f) in msg and "ppo.minibatch_sise" in msg and "unknown key" in msg


def test_wrong_type_names_field_value_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  batch_size: lots\n")
    msg = _error(f)
    assert msg.count("\n") == 0
    assert str(f) in msg and "ppo.batch_size" in msg and "'lots'" in msg


def test_impossible_geometry_names_field(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  batch_size: 512\n  minibatch_size: 48\n")
    msg = _error(f)
    assert msg.count("\n") == 0
    assert "ppo.minibatch_size = 48" in msg and "512" in msg and str(f) in msg


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

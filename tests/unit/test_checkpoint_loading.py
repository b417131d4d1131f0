"""Checkpoints load safely or not at all, with an error naming the file.

Safetensors only for models (pickles can run code), `weights_only=True` for
training state, custom model code refused unless trust_remote_code is on.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.models import CheckpointError, ScalarModel, check_checkpoint, load_policy, load_state_file
from rlhf.tiny import build_tiny_model, train_tokenizer

TEXTS = ["the red fox runs over the hill", "a blue bird sings at dawn"] * 20


class _Payload:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policy")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    build_tiny_model(tok, n_layer=1, n_head=2, n_embd=32, n_positions=64, seed=0).save_pretrained(path)
    ScalarModel.from_causal_lm(load_policy(path), seed=1).save_pretrained(path.parent / "rm")
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_intact_checkpoints_load(policy_dir):
    assert load_policy(policy_dir).config.n_layer == 1
    assert isinstance(ScalarModel.from_pretrained(policy_dir.parent / "rm"), ScalarModel)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_name_the_file(policy_dir, tmp_path, damage):
    for name, loader in [("policy", load_policy), ("rm", ScalarModel.from_pretrained)]:
        d = _copy(policy_dir.parent / name if name == "rm" else policy_dir, tmp_path / f"{name}_{damage}")
        weights = d / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"\x07" * 64, "empty": b""}[damage])
        with pytest.raises(CheckpointError, match="corrupt or truncated safetensors") as e:
            loader(d)
        assert str(weights) in str(e.value)


def test_corrupt_config_is_named(policy_dir, tmp_path):
    d = _copy(policy_dir, tmp_path / "c")
    (d / "config.json").write_text('{"model_type": "gpt2", ')
    with pytest.raises(CheckpointError, match=r"config.json: corrupt or truncated JSON") as e:
        load_policy(d)
    assert str(d / "config.json") in str(e.value)


def test_pickle_weights_are_refused_unread(policy_dir, tmp_path):
    d = _copy(policy_dir, tmp_path / "p")
    marker = tmp_path / "pickle_ran"
    state = dict(load_policy(policy_dir).state_dict(), evil=_Payload(marker))
    torch.save(state, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing; found only pickle weights "
                                              r"\['pytorch_model.bin'\]"):
        load_policy(d)
    assert not marker.exists()


def test_sharded_checkpoint_missing_a_shard_is_named(policy_dir, tmp_path):
    d = _copy(policy_dir, tmp_path / "s")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors",
                            "transformer.ln_f.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: missing"):
        check_checkpoint(d)


def test_custom_code_needs_trust_remote_code(policy_dir, tmp_path):
    d = _copy(policy_dir, tmp_path / "r")
    marker = tmp_path / "remote_code_ran"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="needs custom code .* trust_remote_code is off"):
        load_policy(d)
    with pytest.raises(CheckpointError, match="trust_remote_code is off"):
        ScalarModel.from_pretrained(d)
    assert not marker.exists()
    check_checkpoint(d, trust_remote_code=True)  # the same files pass once the config allows it


def test_training_state_round_trips_and_damage_is_named(tmp_path):
    state = {"model": {"w": torch.randn(4, 4)}, "step": 3, "rng": torch.get_rng_state()}
    good = tmp_path / "policy.pt"
    torch.save(state, good)
    loaded = load_state_file(good)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 3

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{truncated}: corrupt or truncated"):
        load_state_file(truncated)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'missing.pt'}: missing"):
        load_state_file(tmp_path / "missing.pt")


def test_training_state_with_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pickle_ran"
    evil = tmp_path / "driver.pt"
    torch.save({"iteration": 1, "extra": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=f"{evil}: refused, it holds objects other than tensors"):
        load_state_file(evil)
    assert not marker.exists()

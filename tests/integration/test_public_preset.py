"""configs/public-tiny.yaml end to end on the real public sets, shortened to a smoke run.

Every stage reads real data through its adapter (Alpaca + Self-Instruct
demonstrations; HH-RLHF, AlpacaEval and TruthfulQA rankings; Tiny Shakespeare),
and the report judges by the RM with TruthfulQA MC beside it. Skipped without the
shared data folder. The full-size run is the README's command.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestration import pipeline
from rlhf.config import load_config
from rlhf.data import load_records

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} is absent")]
SHORT = [
    "model.tiny.vocab_size=400", "model.tiny.n_layer=1", "model.tiny.n_head=2", "model.tiny.n_embd=32",
    "model.tiny.n_positions=128", "model.context_length=128", "model.max_prompt_tokens=96",
    "model.max_response_tokens=16", "pretrain.steps=4", "pretrain.seq_len=64", "sft.epochs=1",
    "sft.batch_size=16", "rm.epochs=1", "rm.batch_size=32", "ppo.episodes=16", "ppo.batch_size=16",
    "ppo.minibatch_size=8", "ppo.ptx_seq_len=32", "ppo.ptx_ratio=1", "eval.num_prompts=16",
    "eval.num_pretrain_docs=40", "eval.samples_per_prompt=1", "eval.truthfulqa_limit=20",
]


def test_public_preset_runs_every_stage_on_the_public_sets(ray_local, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "run"
    cfg = load_config("public-tiny", [f"data.public_root={DATA}", f"run.output_dir={out}",
                                      f"eval.truthfulqa={DATA / 'truthfulqa' / 'TruthfulQA.csv'}", *SHORT],
                      check_files=True)
    pipeline.main(cfg)
    rankings = load_records(out / "data" / "comparisons_train.jsonl", "comparisons")
    ks = {len(c.responses) for c in rankings}
    assert 2 in ks and max(ks) > 2  # pairs (HH, AlpacaEval) and TruthfulQA's K-way rankings
    assert any(c.soft_label is not None for c in rankings)  # AlpacaEval's soft labels survive
    assert len(load_records(out / "data" / "demonstrations_train.jsonl", "demonstrations")) > 300
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["settings"]["judge"] == "rm" and results["settings"]["data_source"] == "public"
    assert set(results["policies"]) == {"SFT", "PPO", "PPO-ptx"}
    assert results["truthfulqa"]["questions"] == 20
    report = (out / "report.md").read_text()
    assert "## TruthfulQA" in report and "RM win rate" in report

"""TruthfulQA MC1/MC2 in `instructray eval`: lm-evaluation-harness in process, checked
against the same metrics computed here from direct forward passes.

Two tiny policies (different weights, so different figures) on the shared
TruthfulQA file; skipped without it or without the harness.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from orchestration.report import truthfulqa_table
from orchestration.rundir import StageDir
from rlhf.config import ConfigError, load_config
from rlhf.data.adapters import truthfulqa_items
from rlhf.tiny import build_tiny_model, train_tokenizer

pytest.importorskip("lm_eval")
CSV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"
pytestmark = pytest.mark.skipif(not CSV.exists(), reason=f"{CSV} is absent")
LIMIT = 15
CONTEXT = 256


def _loglik(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    assert len(whole) <= CONTEXT  # no truncation on either side to line up
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].double(), -1)
    targets = torch.tensor(whole[1:])
    return logp.gather(1, targets[:, None]).squeeze(1)[-(len(whole) - len(ctx)):].sum().item()


def _ours(model, tok, items) -> dict[str, float]:
    mc1 = mc2 = 0.0
    for item in items:
        ll = [_loglik(model, tok, f"Q: {item.question}\nA:", " " + a) for a in (*item.correct, *item.incorrect)]
        right, wrong = ll[:len(item.correct)], ll[len(item.correct):]
        mc1 += float(right[0] > max(wrong))
        top = max(ll)
        mc2 += sum(math.exp(x - top) for x in right) / sum(math.exp(x - top) for x in ll)
    return {"mc1": mc1 / len(items), "mc2": mc2 / len(items)}


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    root = tmp_path_factory.mktemp("tqa_run")
    items = truthfulqa_items(CSV)
    tok = train_tokenizer([f"{i.question} {' '.join(i.correct + i.incorrect)}" for i in items],
                          vocab_size=800, model_max_length=CONTEXT)
    found = {}
    for name, stage, seed in (("SFT", "sft", 0), ("PPO", "ppo_noptx", 1)):
        model = build_tiny_model(tok, n_layer=1, n_head=2, n_embd=32, n_positions=CONTEXT, seed=seed)

        def write(d, model=model):
            model.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)
        found[name] = StageDir(root, stage)
        found[name].save_final(write)
    return root, found, tok, items[:LIMIT]


def test_harness_figures_equal_direct_forward_passes(policies):
    from orchestration.stages import truthfulqa
    from rlhf.models import load_policy

    root, found, tok, items = policies
    cfg = load_config(None, [f"run.output_dir={root}", f"eval.truthfulqa={CSV}", f"eval.truthfulqa_limit={LIMIT}"],
                      check_files=True)
    out = truthfulqa.evaluate(cfg, found, torch.device("cpu"), torch.float32)
    assert out["questions"] == LIMIT and set(out["policies"]) == {"SFT", "PPO"}
    for name, stage in found.items():
        ours = _ours(load_policy(stage.final).eval(), tok, items)
        assert out["policies"][name]["mc1"] == pytest.approx(ours["mc1"], abs=1e-9), name
        assert out["policies"][name]["mc2"] == pytest.approx(ours["mc2"], abs=1e-5), name
    assert out["policies"]["SFT"] != out["policies"]["PPO"]
    chance_mc1 = sum(1 / (1 + len(i.incorrect)) for i in items) / LIMIT
    assert out["chance"]["mc1"] == pytest.approx(chance_mc1)
    table = truthfulqa_table(out)
    assert f"| SFT | {out['policies']['SFT']['mc1']:.3f} |" in table and "| chance |" in table


def test_a_missing_file_is_named_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.truthfulqa.*file not found"):
        load_config(None, [f"run.output_dir={tmp_path}", f"eval.truthfulqa={tmp_path / 'nope.csv'}"],
                    check_files=True)

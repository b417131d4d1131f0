"""`instructray eval` on a real tiny run directory: results.json, report.md and plots.

The run directory is built for real, in-process: a tiny GPT-2 and tokenizer,
"SFT" = a few steps on the held-out prompts' correct answers (half learnt, so
its samples spread over good and bad), "PPO" = SFT with more steps on those
answers (genuinely better on exactly the prompts evaluated), "PPO-ptx" = the
same plus LM steps on pretraining text, an RM from `ScalarModel.from_causal_lm`,
and metrics.jsonl files written by MetricsLogger.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from orchestration.rundir import MetricsLogger, StageDir
from orchestration.stages import evaluate
from rlhf.collate import lm_batch, pack_text, pad_right
from rlhf.config import load_config
from rlhf.losses import ptx_lm_loss
from rlhf.models import ScalarModel
from rlhf.synthetic import SyntheticSuite, format_response, tokenizer_training_text
from rlhf.tiny import build_tiny_model, train_tokenizer

N_PROMPTS = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _answer_batch(tok, suite: SyntheticSuite):
    """The held-out prompts the evaluation will use, with their correct answers + EOS."""
    seqs, masks = [], []
    for task, prompt in suite.prompts("test", N_PROMPTS):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(format_response(task.answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    return pad_right(seqs, masks, tok.pad_token_id)


def _train(model, batch, steps: int, ptx_blocks=None, lr: float = 4e-3, ptx_coef: float = 0.2
           ) -> list[float]:
    ids, attn, loss_mask = batch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ptx_losses = []
    model.train()
    for step in range(steps):
        loss = ptx_lm_loss(model(input_ids=ids, attention_mask=attn).logits, ids, loss_mask)
        if ptx_blocks is not None:
            b = lm_batch(ptx_blocks[(step * 2) % len(ptx_blocks):][:2])
            ptx = ptx_lm_loss(model(input_ids=b.input_ids).logits, b.input_ids, b.loss_mask)
            ptx_losses.append(ptx.item())
            # A small coefficient: this 1-layer model has too little capacity to learn
            # the answers while fitting much text (the report measures that trade-off).
            loss = loss + ptx_coef * ptx
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return ptx_losses


def _save(root, stage: str, model, tok) -> None:
    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    StageDir(root, stage).save_final(write)


def _log(root, stage: str, records: list[dict]) -> None:
    logger = MetricsLogger(StageDir(root, stage), tensorboard=False)
    for k, rec in enumerate(records):
        logger.log(rec.get("iteration", k), **rec)
    logger.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"run.output_dir={root}", "run.device=cpu", f"eval.num_prompts={N_PROMPTS}",
                             "eval.num_pretrain_docs=150", "model.max_response_tokens=16",
                             "ppo.ptx_seq_len=64"])
    suite = SyntheticSuite(cfg.data.synthetic.seed)
    tok = train_tokenizer(tokenizer_training_text(0, 200), vocab_size=400, model_max_length=128)
    answers = _answer_batch(tok, suite)
    sft = build_tiny_model(tok, n_layer=1, n_head=2, n_embd=64, n_positions=128, seed=0)
    _train(sft, answers, steps=40)
    ppo = copy.deepcopy(sft)
    _train(ppo, answers, steps=40)
    ptx_blocks = pack_text(tok, [r.text for r in suite.pretraining_text("train", 300)], 64)
    ppo_ptx = copy.deepcopy(sft)
    ptx_curve = _train(ppo_ptx, answers, steps=40, ptx_blocks=ptx_blocks)
    _save(root, "sft", sft, tok)
    _save(root, "ppo", ppo_ptx, tok)
    _save(root, "ppo_noptx", ppo, tok)
    ScalarModel.from_causal_lm(sft, seed=0).save_pretrained(root / "rm" / "final")
    tok.save_pretrained(root / "rm" / "final")
    (root / "rm" / "final" / "COMPLETE").write_text("test")
    _log(root, "rm", [{"loss": 0.69, "accuracy": 0.55}, {"loss": 0.6, "val_gold_accuracy": 0.625}])
    iters = range(len(ptx_curve))[::5]
    _log(root, "ppo", [{"iteration": k, "rm_score_mean": 0.1 * k, "gold_score": 0.02 * k, "kl_per_sequence": 0.3 * k,
                        "ptx_loss": ptx_curve[k]} for k in iters])
    # Plain PPO logs ptx_loss as NaN (no ptx step): the plot must skip it, not crash.
    _log(root, "ppo_noptx", [{"iteration": k, "rm_score_mean": 0.12 * k, "kl_per_sequence": 0.4 * k, "ptx_loss": math.nan}
                             for k in iters])
    summary = evaluate.main(cfg)
    table = summary["table"]
    results = json.loads((root / "eval" / "results.json").read_text())
    return root, results, table


def test_results_in_range(run):
    _, results, _ = run
    rows = results["policies"]
    assert set(rows) == {"SFT", "PPO", "PPO-ptx"}
    assert results["settings"]["num_prompts"] == N_PROMPTS and results["settings"]["judge"] == "gold"
    for name, r in rows.items():
        for key in ("gold_win_rate", "rm_win_rate", "gold_score_mean", "gold_exact"):
            assert 0.0 <= r[key] <= 1.0, (name, key, r[key])
        lo, hi = r["gold_win_rate_ci"]
        assert lo <= r["gold_win_rate"] <= hi
        assert math.isfinite(r["rm_score_mean"]) and math.isfinite(r["kl_to_sft"])
        # log(400) = 6 nats is a uniform guess over the vocabulary; the models have only
        # seen answers (and ptx text), so they sit near it but not far above.
        assert 0.5 < r["lm_loss"] < 12.0
        assert 1.0 <= r["response_tokens_mean"] <= 16.0
    assert rows["SFT"]["kl_to_sft"] == 0.0 and rows["SFT"]["lm_loss_delta_vs_sft"] == 0.0
    # KL(pi || SFT) >= 0 in expectation; 64 samples of a clearly moved policy stay well above 0.
    assert rows["PPO"]["kl_to_sft"] > 0.5 and rows["PPO-ptx"]["kl_to_sft"] > 0.5


def test_sft_against_itself_is_a_coin_flip(run):
    # Fresh SFT samples vs SFT samples (independent seeds): each prompt's outcome
    # is 1 / 0.5 / 0 with variance <= 1/4, so the mean's sd is <= 0.5 / sqrt(64)
    # = 0.0625; 3 sd = 0.19. The SFT policy is half-trained, so outcomes really
    # vary (not all ties, which would make 0.5 trivial).
    _, results, _ = run
    sft = results["policies"]["SFT"]
    assert abs(sft["gold_win_rate"] - 0.5) <= 3 * 0.5 / math.sqrt(N_PROMPTS)
    assert 0.1 < sft["gold_score_mean"] < 0.9 and sft["gold_exact"] < 0.9


def test_improved_policies_beat_sft(run):
    _, results, _ = run
    for name in ("PPO", "PPO-ptx"):
        r = results["policies"][name]
        assert r["gold_win_rate"] > 0.6 and r["gold_win_rate_ci"][0] > 0.5, (name, r["gold_win_rate"])
        assert r["gold_score_mean"] > results["policies"]["SFT"]["gold_score_mean"] + 0.1


def test_lm_loss_sees_the_ptx_training(run):
    # Only PPO-ptx was trained on pretraining text; held-out text of the same
    # distribution must show it, paired over the same blocks.
    _, results, _ = run
    eff = results["ptx_effect"]
    assert eff["lm_loss_ptx_minus_ppo"] < 0 and eff["lm_loss_ptx_minus_ppo_ci"][1] < 0
    assert results["policies"]["PPO-ptx"]["lm_loss"] < results["policies"]["PPO"]["lm_loss"]


def test_report_and_plots(run):
    root, results, table = run
    report = (root / "report.md").read_text()
    for row in ("| SFT (resampled) |", "| PPO |", "| PPO-ptx |"):
        assert row in report and row in table
    assert f"{results['policies']['PPO-ptx']['gold_win_rate']:.2f}" in table
    assert "held-out val_gold_accuracy: 0.625" in report  # the RM stage's last accuracy numbers
    assert "training accuracy (last logged): 0.550" in report
    rows = results["policies"]
    assert "## The ptx effect" in report
    fams = rows["PPO"]["gold_by_family"]
    assert "## Gold score by task family" in report and len(fams) >= 2
    first = sorted(fams)[0]  # each family's row carries every policy's own score
    assert f"| {first} | " + " | ".join(f"{rows[n]['gold_by_family'][first]:.3f}"
                                          for n in ("SFT", "PPO", "PPO-ptx")) + " |" in report
    assert f"PPO {rows['PPO']['lm_loss']:.3f}, PPO-ptx {rows['PPO-ptx']['lm_loss']:.3f}" in report
    for name in ("win_rates.png", "lm_loss.png", "training_curves.png"):
        png = root / "plots" / name
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        assert f"](plots/{name})" in report
    # one record per sample: each prompt's samples_per_prompt (tiny: 4) independent responses in a row
    records = [json.loads(line) for line in (root / "eval" / "samples.jsonl").read_text().splitlines()]
    reps = results["settings"]["samples_per_prompt"]
    assert reps == 4 and len(records) == N_PROMPTS * reps
    prompts = [r["prompt"] for r in records]
    assert all(len(set(prompts[i:i + reps])) == 1 for i in range(0, len(prompts), reps))
    assert len({r["SFT"]["response"] for r in records}) > N_PROMPTS  # samples differ within a prompt
    assert f"{N_PROMPTS} held-out prompts, 4 independent responses each" in report


def test_resume_rewrites_report_without_reevaluating(run, capsys):
    root, results, _ = run
    (root / "report.md").unlink()
    cfg = load_config(None, [f"run.output_dir={root}", "run.device=cpu"])
    before = (root / "eval" / "results.json").stat().st_mtime_ns
    evaluate.main(cfg, resume=True)
    assert (root / "eval" / "results.json").stat().st_mtime_ns == before
    assert "| PPO-ptx |" in (root / "report.md").read_text()
    assert "| PPO-ptx |" in capsys.readouterr().out  # the table is printed


def test_report_without_results_or_metrics_does_not_crash(tmp_path):
    from orchestration.report import write_report

    table = write_report(tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "eval/results.json is missing" in table
    assert "No RM accuracy was recorded." in report
    assert not list((tmp_path / "plots").glob("*.png"))


def test_intervals_resample_prompts_not_samples():
    # 2 samples per prompt: a prompt's samples are correlated, so the bootstrap unit is the prompt
    data = evaluate.HeldOut(["a", "a", "b", "b"], None, torch.zeros(1, 4), repeats=2)
    assert data.by_prompt([1.0, 0.0, 1.0, 1.0]) == [0.5, 1.0]

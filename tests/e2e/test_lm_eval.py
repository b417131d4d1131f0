"""The real lm-evaluation-harness against our endpoint, as its users run it.

lm-eval's `local-completions` model talks to a served tiny policy trained here
on TruthfulQA text: TruthfulQA MC1 as local task files (multiple choice by
log-likelihood: `echo`, `logprobs`, token-id prompts in batches) and the
generation task (greedy, stop at a newline). Per item, the harness's
log-likelihoods equal a direct forward pass of the same model over the same
tokens, and its generations equal Hugging Face's own greedy decoding. Nothing
comes from the hub; skipped without the shared TruthfulQA file.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import side_app

pytestmark = pytest.mark.slow
lm_eval = pytest.importorskip("lm_eval")
CSV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"
MODEL = "tiny-truthfulqa"
CONTEXT = 128
QUESTIONS = 12


def _train_on_truthfulqa(out: Path) -> Path:
    """A tiny GPT-2 and tokenizer fitted for a few hundred steps to "Q: ...\\nA: ..." lines."""
    from rlhf.data.adapters import truthfulqa_items
    from rlhf.models import load_policy, load_tokenizer
    from rlhf.tiny import make_tiny_base

    lines = [f"Q: {i.question}\nA: {a}" for i in truthfulqa_items(CSV) for a in (*i.correct[:1], *i.incorrect[:1])]
    ckpt = make_tiny_base(out, lines, vocab_size=512, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2)
    tok, model = load_tokenizer(ckpt), load_policy(ckpt)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = tok([lines[(step * 16 + j) % len(lines)] for j in range(16)], return_tensors="pt",
                    padding=True, truncation=True, max_length=CONTEXT)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 5.0  # it learned something: chance over 512 tokens is 6.2
    model.save_pretrained(ckpt, safe_serialization=True)
    return ckpt


@pytest.fixture(scope="module")
def lm_endpoint(endpoint, tmp_path_factory):
    """A second application on the package's Serve instance, under /lm."""
    from rlhf.config import ServeConfig

    if not CSV.exists():
        pytest.skip(f"{CSV} is absent")
    ckpt = _train_on_truthfulqa(tmp_path_factory.mktemp("lm_eval") / "policy")
    port = int(endpoint.url.rsplit(":", 1)[1])
    cfg = ServeConfig(port=port, max_tokens_limit=32, max_batch_size=8, batch_wait_timeout_s=0.01)
    with side_app(endpoint, "instructray-lm-eval", "/lm", ckpt, cfg, MODEL) as url:
        yield url + "/v1", ckpt


def _run(tasks_dir: Path, task: str, base_url: str, ckpt: Path) -> list[dict]:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[task], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        model_args={"base_url": base_url + "/completions", "model": MODEL, "tokenizer": str(ckpt),
                    "tokenizer_backend": "huggingface", "max_length": CONTEXT, "batch_size": 8,
                    "num_concurrent": 1, "max_retries": 1})
    samples = out["samples"][task]
    assert len(samples) == QUESTIONS and task in out["results"]
    return samples


def test_lm_eval_scores_multiple_choice_and_generates_through_the_endpoint(lm_endpoint, tmp_path):
    from rlhf.data.lm_eval_tasks import TASKS, write_truthfulqa_tasks
    from rlhf.models import load_policy, load_tokenizer

    base_url, ckpt = lm_endpoint
    tasks_dir = write_truthfulqa_tasks(CSV, tmp_path / "tasks", limit=QUESTIONS)
    tok, model = load_tokenizer(ckpt), load_policy(ckpt).eval()

    mc1 = _run(tasks_dir, TASKS["mc1"], base_url, ckpt)
    checked = 0
    for s in mc1:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ctx = tok(context, add_special_tokens=False).input_ids
            whole = tok(context + continuation, add_special_tokens=False).input_ids
            ids = whole[-(CONTEXT - 1):]  # the harness keeps the last max_length - 1 tokens
            n_cont = len(whole) - len(ctx)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            targets = torch.tensor(ids[1:])
            ours = logp[:-1].gather(1, targets[:, None]).squeeze(1)[-n_cont:].sum().item()
            assert resp[0][0] == pytest.approx(ours, abs=2e-3), (context, continuation)
            checked += 1
    assert checked > 2 * QUESTIONS  # every choice of every question, not a few

    gen = _run(tasks_dir, TASKS["gen"], base_url, ckpt)
    for s in gen:
        (context, kwargs), = s["arguments"]
        ids = tok(context, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=kwargs["max_gen_toks"], pad_token_id=tok.pad_token_id)
        ours = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert s["resps"][0][0] == ours, context

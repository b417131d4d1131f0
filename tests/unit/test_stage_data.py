"""Stage data: the synthetic files, gold rankings, hash splits, token-count filtering."""
import json
import logging

from orchestration import stage_data
from rlhf.config import load_config
from rlhf.data import Comparison, Demonstration, PromptRecord, TextRecord, write_jsonl
from rlhf.synthetic import gold_score, parse_prompt
from rlhf.synthetic.suite import RUN_ON_WORDS
from rlhf.synthetic.tasks import split_of


def _cfg(tmp_path, *extra):
    return load_config("tiny", [f"run.output_dir={tmp_path}", "data.synthetic.num_demonstrations=20",
                                "data.synthetic.num_comparisons=10", "data.synthetic.num_prompts=10",
                                "data.synthetic.num_pretrain_docs=10", "data.synthetic.num_eval_prompts=6",
                                "data.synthetic.num_eval_comparisons=8", "eval.num_pretrain_docs=4", *extra])


def test_gold_rankings_rank_by_gold_score_best_first():
    prompt = "Instruction: reverse the words\nInput: red fox cup\nResponse:"
    responses = (" cup red fox", " cup fox red", " red", " cup fox fox")
    [gold] = stage_data.gold_rankings([Comparison(prompt, responses, (3, 2, 1, 0))])
    scores = [gold_score(parse_prompt(prompt), r) for r in responses]
    for i in range(4):
        for j in range(4):
            if scores[i] > scores[j]:
                assert gold.ranks[i] < gold.ranks[j]
    assert gold.ranks[1] == 0  # the exact answer


def test_synthetic_records_have_the_configured_sizes_and_split_ownership(tmp_path):
    recs = stage_data.synthetic_records(_cfg(tmp_path))
    assert len(recs["demonstrations_train"]) == 20 and len(recs["demonstrations_valid"]) == 6
    assert len(recs["pretrain_test"]) == 4 and len(recs["prompts_test"]) == 6
    assert len(recs["comparisons_valid"]) == len(recs["comparisons_test"]) == 8  # the RM's held-out rankings
    assert all(split_of(r.prompt) == "valid" for r in recs["comparisons_valid"])
    gold = recs["comparisons_valid_gold"]
    assert [g.responses for g in gold] == [c.responses for c in recs["comparisons_valid"]][:len(gold)]
    assert "comparisons_train_gold" not in recs  # training sees the noisy labels only


def test_run_ons_go_to_training_rankings_only(tmp_path):
    recs = stage_data.synthetic_records(_cfg(tmp_path, "data.synthetic.run_on_prob=0.5"))
    def longest(name):
        return max(len(r.split()) for c in recs[name] for r in c.responses)
    assert longest("comparisons_train") >= RUN_ON_WORDS[0]
    assert longest("comparisons_valid") < RUN_ON_WORDS[0] and longest("comparisons_test") < RUN_ON_WORDS[0]


def test_materialise_is_deterministic_and_written_once(tmp_path):
    cfg = _cfg(tmp_path)
    folder = stage_data.materialise(cfg)
    path = stage_data.data_file(cfg, "comparisons", "valid")
    first, mtime = path.read_text(), path.stat().st_mtime_ns
    stage_data.materialise(cfg)
    assert path.stat().st_mtime_ns == mtime  # same data: not rewritten
    other = _cfg(tmp_path / "again")
    stage_data.materialise(other)
    assert stage_data.data_file(other, "comparisons", "valid").read_text() == first
    assert (folder / stage_data.MANIFEST).exists()


def test_split_by_hash_follows_prompt_or_text():
    recs = [Demonstration(f"prompt {i}", "r") for i in range(50)] + [TextRecord(f"text {i}") for i in range(50)]
    splits = stage_data.split_by_hash(recs)
    assert sum(map(len, splits.values())) == 100
    for split, items in splits.items():
        assert all(split_of(getattr(r, "prompt", None) or r.text) == split for r in items)


class _CharTokenizer:
    """One token per character: token counts are easy to reason about."""
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def test_files_source_splits_files_and_filters_long_prompts_by_tokens(tmp_path, caplog):
    demos = [Demonstration("p" * (5 + i % 20) + f" {i}", f"answer {i}") for i in range(60)]
    files = {"demonstrations": demos, "comparisons": [Comparison("q", ("a", "b"), (0, 1))] * 3,
             "prompts": [PromptRecord(d.prompt) for d in demos], "pretrain_text": [TextRecord("some text")] * 3}
    for name, recs in files.items():
        write_jsonl(recs, tmp_path / f"{name}.jsonl")
    cfg = _cfg(tmp_path / "run", "data.source=files", "model.max_prompt_tokens=16",
               *[f"data.{k}={tmp_path / k}.jsonl" for k in files])
    stage_data.materialise(cfg)
    everything = [json.loads(line) for s in ("train", "valid", "test")
                  for line in stage_data.data_file(cfg, "demonstrations", s).read_text().splitlines()]
    assert sorted(r["response"] for r in everything) == sorted(d.response for d in demos)
    train_all = stage_data.load(cfg, "demonstrations", "train")
    with caplog.at_level(logging.WARNING):
        kept = stage_data.load(cfg, "demonstrations", "train", tokenizer=_CharTokenizer())
    assert all(len(r.prompt) <= 16 for r in kept)
    dropped = sum(len(r.prompt) > 16 for r in train_all)
    assert len(kept) == len(train_all) - dropped and dropped > 0
    assert f"dropped {dropped} of {len(train_all)}" in caplog.text
    assert stage_data.load(cfg, "comparisons", "valid", gold=True) == []  # no gold labeler for files

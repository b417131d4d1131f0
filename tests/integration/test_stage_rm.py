"""Stage 2: K-way batches with mixed K (direct call), and accuracy and bias of the Ray Train run."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from orchestration import stage_data
from orchestration.rundir import StageDir
from orchestration.stages import rm
from rlhf.collate import TokenLimits, collate_rankings, encode_comparisons, encode_pair
from rlhf.data import Comparison, load_records
from rlhf.losses import rm_ranking_loss
from rlhf.models import ScalarModel, load_policy, load_tokenizer
from rlhf.sampling import text_sampler
from rlhf.seeds import derive_seed

LIMITS = TokenLimits(64, 16)


def _score_alone(model: ScalarModel, tok, prompt: str, response: str) -> float:
    """One completion, unpadded, in its own forward pass."""
    ids, _ = encode_pair(tok, prompt, response, LIMITS)
    return float(model.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager adds the mask, sdpa may take it as bool
def test_mixed_k_batch_scores_every_pair_of_each_prompt(tiny_lm, tiny_tokenizer, attention):
    model = ScalarModel.from_causal_lm(tiny_lm, seed=1).eval()
    model.model.set_attn_implementation(attention)
    comps = [Comparison("Instruction: copy the words\nInput: red fox\nResponse:", (" red fox", " fox"), (0, 1)),
             Comparison("Instruction: add the numbers\nInput: 3 + 4\nResponse:",
                        (" 7", " 8", " 12", " 1 2 3 4 5", " 6"), (0, 2, 4, 3, 1)),
             Comparison("Instruction: sort the words\nInput: b a c\nResponse:",
                        tuple(f" {w}" for w in "a b c;b a c;a b;c b a;a;a b c c;x y z;cup;a c b".split(";")),
                        (0, 3, 2, 5, 6, 1, 8, 7, 4)),
             Comparison("Instruction: first word\nInput: a b\nResponse:", (" a", " b"), (0, 1))]
    groups, dropped = encode_comparisons(tiny_tokenizer, comps, LIMITS)
    assert dropped == 0 and [len(g) for g in groups] == [2, 5, 9, 2]
    batch = collate_rankings(groups, tiny_tokenizer.pad_token_id)
    # each prompt once; the short rankings share rows beside the others
    assert batch.input_ids.shape[0] < 4 and len(batch.score_index) == 18
    with torch.no_grad():
        scores = rm.rm_scores(model, batch)
        loss, stats = rm_ranking_loss(scores, batch.ranks, batch.group_ids)
        alone = [[_score_alone(model, tiny_tokenizer, c.prompt, r) for r in c.responses] for c in comps]
    # packing changes nothing: each completion scores what its own unpadded forward pass gives
    assert scores.tolist() == pytest.approx([s for row in alone for s in row], abs=1e-5)
    per_prompt = []
    for c, s in zip(comps, alone):
        pairs = [(w, l) for w, l in itertools.permutations(range(c.k), 2) if c.ranks[w] < c.ranks[l]]
        assert len(pairs) == c.k * (c.k - 1) // 2  # all C(K, 2) pairs
        per_prompt.append(sum(-F.logsigmoid(torch.tensor(s[w] - s[l])) for w, l in pairs) / len(pairs))
    assert float(loss) == pytest.approx(float(sum(per_prompt) / 4), rel=1e-5)
    assert stats["n_pairs"] == 1 + 10 + 36 + 1


def _pair_accuracy(model, tok, comparisons) -> float:
    right = total = 0
    for c in comparisons:
        s = [_score_alone(model, tok, c.prompt, r) for r in c.responses]
        for w, l in c.pairs():
            right, total = right + (s[w] > s[l]), total + 1
    return right / total


@pytest.mark.slow
def test_rm_stage_reports_its_true_heldout_accuracy(tiny_run):
    cfg, results = tiny_run
    summary = results["rm"]
    model = ScalarModel.from_pretrained(StageDir(cfg.output_dir, "rm").final).eval()
    tok = load_tokenizer(StageDir(cfg.output_dir, "rm").final)
    with torch.no_grad():
        for name, gold in (("noisy", False), ("gold", True)):
            comps = stage_data.load(cfg, "comparisons", "valid", tok, gold=gold)
            n_pairs = sum(len(c.pairs()) for c in comps)
            assert summary["valid"][name]["n_pairs"] == n_pairs
            # batched (padded) vs one-at-a-time scores: allow one near-tie pair to flip
            assert summary["valid"][name]["accuracy"] == pytest.approx(_pair_accuracy(model, tok, comps),
                                                                       abs=1.01 / n_pairs)
    assert len(set(summary["weights_checksums"])) == 1 and len(summary["weights_checksums"]) == 2


@pytest.mark.slow
def test_rm_bias_centres_heldout_demonstrations_at_zero(tiny_run):
    cfg, results = tiny_run
    final = StageDir(cfg.output_dir, "rm").final
    model, tok = ScalarModel.from_pretrained(final).eval(), load_tokenizer(final)
    demos = stage_data.load(cfg, "demonstrations", "valid", tok)
    with torch.no_grad():
        scores = torch.tensor([_score_alone(model, tok, d.prompt, d.response) for d in demos])
    assert model.reward_bias == pytest.approx(results["rm"]["reward_bias"])
    assert abs(model.reward_bias) > 1e-3  # a real shift, not a default
    assert float(scores.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(scores.std()) > 1e-3  # centred, not collapsed


@pytest.mark.slow
def test_the_rm_is_deeper_than_sft_and_trains_on_the_sft_policys_ranked_samples(tiny_run):
    cfg, results = tiny_run
    final = StageDir(cfg.output_dir, "rm").final
    assert cfg.rm.added_layers > 0 and cfg.data.synthetic.policy_comparisons > 0
    assert ScalarModel.from_pretrained(final).config.n_layer == cfg.model.tiny.n_layer + cfg.rm.added_layers
    tok = load_tokenizer(final)
    ranked = load_records(rm.policy_rankings_file(cfg), "comparisons")
    made_up = stage_data.load(cfg, "comparisons", "train", tok)
    assert 0 < len(ranked) <= cfg.data.synthetic.policy_comparisons
    assert results["rm"]["train_prompts"] == len(made_up) + len(ranked)
    # The SFT model's own T=1 samples: drawn again from it, the same rankings come back.
    sft = load_policy(StageDir(cfg.output_dir, "sft").final).eval()
    again = stage_data.synthetic_suite(cfg).comparisons(
        "train", cfg.data.synthetic.policy_comparisons, cfg.data.synthetic.k_min, cfg.data.synthetic.k_max,
        sampler=text_sampler(sft, tok, max_new_tokens=cfg.model.max_response_tokens,
                             seed=derive_seed(cfg.run.seed, "policy comparisons")))
    assert again == ranked

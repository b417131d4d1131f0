"""Packed K-way rankings: the attention pattern and where each completion's score is read."""
import torch

from rlhf.collate import EncodedRanking, collate_rankings, pack_lm, segment_attention_mask


def _allowed(seg: list[int], prompt: list[int], q: int, k: int) -> bool:
    """Reference, one pair at a time: may token q see token k?"""
    if q == k:
        return True
    return k < q and seg[q] >= 0 and seg[k] >= 0 and seg[k] in (prompt[q], seg[q])


def test_segment_mask_matches_pairwise_rule():
    # Row 0: one prompt (0) and three completions; row 1: two rankings (prompts 0 and 3).
    segs = [[0, 0, 1, 1, 2, 3, 3, 3, -1, -1], [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]]
    prompts = [[0, 0, 0, 0, 0, 0, 0, 0, -1, -1], [0, 0, 0, 0, 0, 3, 3, 3, 3, 3]]
    mask = segment_attention_mask(torch.tensor(segs), torch.tensor(prompts))
    assert mask.shape == (2, 1, 10, 10)
    for b, (seg, prompt) in enumerate(zip(segs, prompts)):
        want = [[_allowed(seg, prompt, q, k) for k in range(10)] for q in range(10)]
        assert mask[b, 0].tolist() == want
    assert not mask[1, 0, 7, :5].any()  # the second ranking never sees the first


def test_collate_packs_prompt_once_and_indexes_last_tokens():
    groups = [EncodedRanking([5, 6, 7], [[10, 2], [11], [12, 13, 2]], [1, 2, 0]),
              EncodedRanking([8], [[20, 2], [21, 22, 2]], [0, 1])]
    b = collate_rankings(groups, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 10, 2, 11, 12, 13, 2], [8, 20, 2, 21, 22, 2, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5], [0, 1, 2, 1, 2, 3, 0, 0, 0]]
    assert b.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3, 3], [0, 1, 1, 2, 2, 2, -1, -1, -1]]
    flat = b.input_ids.flatten()[b.score_index].tolist()
    assert flat == [2, 11, 2, 2, 2] and b.score_index.tolist() == [4, 5, 8, 9 + 2, 9 + 5]
    assert b.ranks.tolist() == [1, 2, 0, 0, 1] and b.group_ids.tolist() == [0, 0, 0, 1, 1]
    assert b.num_tokens == 9 + 6


def test_short_rankings_share_a_row_and_keep_their_order_in_the_scores():
    groups = [EncodedRanking([8], [[20, 2], [21, 2]], [0, 1]),
              EncodedRanking([5, 6, 7], [[10, 2], [11], [12, 13, 2]], [1, 2, 0]),
              EncodedRanking([9, 9], [[30]], [0])]
    b = collate_rankings(groups, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 10, 2, 11, 12, 13, 2], [8, 20, 2, 21, 2, 9, 9, 30, 0]]
    assert b.segment_ids[1].tolist() == [0, 1, 1, 2, 2, 3, 3, 4, -1]
    assert b.prompt_ids[1].tolist() == [0, 0, 0, 0, 0, 3, 3, 3, -1]
    assert b.position_ids[1].tolist() == [0, 1, 2, 1, 2, 0, 1, 2, 0]
    assert b.input_ids.flatten()[b.score_index].tolist() == [2, 2, 2, 11, 2, 30]  # in the rankings' order
    assert b.group_ids.tolist() == [0, 0, 1, 1, 1, 2] and b.ranks.tolist() == [0, 1, 1, 2, 0, 0]


def test_pack_lm_fills_rows_first_fit_and_keeps_each_sequence_whole():
    seqs = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7, 8], [0, 0, 1, 1, 1]), ([9, 10], [1, 1]), ([11] * 7, [0] * 6 + [1])]
    blocks = torch.arange(20, 30).view(1, 10)
    b = pack_lm(seqs, blocks, pad_id=0)
    assert b.input_ids.shape == (3, 10)  # lengths 7+3 and 5+2 fill two rows, the block a third
    assert b.input_ids[0].tolist() == [11] * 7 + [1, 2, 3]
    assert b.input_ids[1].tolist() == [4, 5, 6, 7, 8, 9, 10, 0, 0, 0]
    assert b.position_ids[0].tolist() == list(range(7)) + [0, 1, 2]
    assert b.segment_ids[1].tolist() == [1] * 5 + [2] * 2 + [-1] * 3
    # A sequence's first token is never a target: in a row of its own nothing predicts it.
    assert b.loss_mask[1].tolist() == [0, 0, 1, 1, 1, 0, 1, 0, 0, 0]
    assert b.loss_mask[2].sum() == 0 and b.ptx_mask[:2].sum() == 0
    assert b.ptx_mask[2].tolist() == [0] + [1] * 9
    mask = b.attention_mask[0, 0]
    assert not mask[7:, :7].any() and mask[9, 7:].all() and mask[6, :7].all()
    assert b.num_tokens == 27

"""What a run hands to the rest of the ecosystem loads with plain `transformers`.

On the shared tiny run's real stage outputs: the SFT policy directory loads with
`AutoModelForCausalLM` / `AutoTokenizer` and carries its chat template; the RM
directory loads with `AutoModelForSequenceClassification`, whose logit plus
`config.reward_bias` is our RM score (the README's recipe).
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from orchestration.rundir import StageDir
from rlhf.models import ScalarModel, load_policy


def test_policy_and_reward_model_load_with_auto_classes(tiny_run):
    cfg, _ = tiny_run
    policy_dir, rm_dir = StageDir(cfg.output_dir, "sft").final, StageDir(cfg.output_dir, "rm").final
    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "reverse the words: red fox cup"}],
                                     tokenize=False, add_generation_prompt=True)
    assert "red fox cup" in prompt and tok.chat_template
    batch = tok(["Instruction: copy the words\nInput: red fox\nResponse: red fox", "Instruction: sort"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(policy_dir).eval()(**batch).logits
        ours = load_policy(policy_dir).eval()(**batch).logits
    torch.testing.assert_close(hf_logits, ours, rtol=0, atol=0)

    hf_rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    assert hf_rm.config.num_labels == 1 and hf_rm.config.reward_bias != 0.0  # normalised at the end of stage 2
    with torch.no_grad():
        hf_score = hf_rm(**batch).logits.squeeze(-1) + hf_rm.config.reward_bias
        ours = ScalarModel.from_pretrained(rm_dir).eval().score(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(hf_score, ours, rtol=0, atol=1e-5)

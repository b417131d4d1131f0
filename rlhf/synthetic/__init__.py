"""Deterministic synthetic instruction suite with a programmatic gold labeler."""
from rlhf.synthetic.corpus import pretraining_corpus, tokenizer_training_text
from rlhf.synthetic.labeler import gold_score, noiseless_ranks, rank_responses
from rlhf.synthetic.suite import SyntheticSuite
from rlhf.synthetic.tasks import FAMILIES, Task, format_prompt, format_response, parse_prompt

__all__ = [
    "FAMILIES", "SyntheticSuite", "Task", "format_prompt", "format_response",
    "gold_score", "noiseless_ranks", "parse_prompt", "pretraining_corpus",
    "rank_responses", "tokenizer_training_text",
]

"""Pure RLHF math and model plumbing; no Ray here (docs/architecture.md)."""
import os

if os.environ.get("INSTRUCTRAY_WORKER") == "1":
    # The Ray workers we start never use transformers' assisted decoding, its only reader of
    # scikit-learn, which it would import in each of them (1.4 s where lm-eval installed it).
    import transformers.utils

    transformers.utils.is_sklearn_available = lambda: False

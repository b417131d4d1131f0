"""Pure RLHF math and model plumbing; no Ray here (docs/architecture.md)."""
import os

# Set in the Ray workers we start (orchestration/cluster.py, actors/resources.py), not the driver.
WORKER_ENV = {"INSTRUCTRAY_WORKER": "1"}

if os.environ.get("INSTRUCTRAY_WORKER") == "1":
    # Those workers never use transformers' assisted decoding, its only reader of scikit-learn,
    # which it would import in each of them (1.4 s where lm-eval installed it).
    import transformers.utils

    transformers.utils.is_sklearn_available = lambda: False

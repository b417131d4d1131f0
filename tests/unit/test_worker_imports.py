"""What a Ray worker of ours imports: rlhf/__init__.py keeps scikit-learn out."""
import importlib.util
import os
import subprocess
import sys

import pytest

CODE = "import actors.generator, sys; print('sklearn' in sys.modules)"


def _imports_sklearn(env: dict) -> bool:
    out = subprocess.run([sys.executable, "-c", CODE], env=os.environ | env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip() == "True"


def test_a_worker_process_never_imports_scikit_learn():
    assert not _imports_sklearn({"INSTRUCTRAY_WORKER": "1"})


def test_the_flag_is_what_keeps_it_out_where_scikit_learn_is_installed():
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn is not installed (lm-eval, a test extra, brings it)")
    assert _imports_sklearn({"INSTRUCTRAY_WORKER": "0"})

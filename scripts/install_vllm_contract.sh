#!/usr/bin/env bash
# Install the real vllm==0.33.0 wheel into a CPU venv so tests/contract can check our
# calls against its real classes. vLLM has no CPU kernels and pins
# torch==2.14 / CUDA wheels, so the wheel goes in with --no-deps plus only the
# pure-Python modules that `from vllm import LLM, SamplingParams, TokensPrompt` and
# `vllm.distributed.weight_transfer` import. torch, transformers and ray must not move.
#
# Usage: scripts/install_vllm_contract.sh [python]   (default: .venv/bin/python)
# Idempotent: a second run finds everything satisfied and only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
PIP=("$PY" -m pip install -q --disable-pip-version-check -c constraints-cpu.txt)

versions() {  # torch / transformers / ray as installed now
  "$PY" - <<'PYEOF'
from importlib.metadata import version, PackageNotFoundError
out = []
for name in ("torch", "transformers", "ray"):
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(f"{name}==absent")
print(" ".join(out))
PYEOF
}

before="$(versions)"

# Modules vLLM imports that the project mostly has already (through ray[serve],
# fastapi, openai): installed with their own dependencies only if missing; never
# upgraded (vLLM's own pins, e.g. fastapi<0.137, would fight Ray Serve's). httpx is
# what `ray.serve.llm` needs on top (tests/contract/test_serve_llm_api.py).
"${PIP[@]}" aiohttp requests openai pillow uvloop prometheus_client fastapi httpx

# The wheel and the leaf modules it imports on CPU, all without dependencies.
# Pins follow vllm 0.33.0's own metadata: oss-harmony provides `openai_harmony`;
# xgrammar needs apache-tvm-ffi (`tvm_ffi`) at import; einops is for the worker
# class (gpu_worker.Worker, checked for name clashes); triton is not needed.
"${PIP[@]}" --no-deps \
  vllm==0.33.0 \
  cloudpickle cbor2 psutil 'pyzmq>=25.0.0' msgspec pybase64 cachetools py-cpuinfo \
  partial-json-parser 'oss-harmony>=0.0.11' einops \
  xgrammar==0.2.8 apache-tvm-ffi==0.1.11 'llguidance>=1.7.0,<1.8.0'

after="$(versions)"
if [[ "$before" != "$after" ]]; then
  echo "install_vllm_contract: core versions changed: $before -> $after" >&2
  exit 1
fi
if "$PY" -m pip list --format=freeze 2>/dev/null | grep -qi '^nvidia-'; then
  echo "install_vllm_contract: CUDA (nvidia-*) wheels are installed; refusing" >&2
  exit 1
fi
"$PY" -c "from vllm import LLM, SamplingParams, TokensPrompt
from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory
import vllm; assert vllm.__version__.startswith('0.33.0'), vllm.__version__" 2>/dev/null \
  || { echo "install_vllm_contract: vllm does not import" >&2; exit 1; }
echo "install_vllm_contract: vllm 0.33.0 ready ($after)"

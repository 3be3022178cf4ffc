#!/usr/bin/env bash
# The GPU acceptance run: what only a GPU can show, in < 10 minutes on one GPU, as one markdown table.
#
#   bash bench/gpu/acceptance.sh                 # on a GPU machine with disa installed (pip install -e '.[dev]')
#   bash bench/gpu/acceptance.sh --dry-run       # the plan and what would be skipped, runs nothing
#   bash bench/gpu/acceptance.sh --device cpu    # the same commands on CPU in float32 (a check of the script)
#
# Parts (bench/gpu/acceptance.py has the details; each is skipped with its reason when a dependency is missing):
#   pipeline/<stage>   disa sample / label / fit-z / train / eval on examples/countdown.yaml, CUDA, bfloat16
#   stage1/hf          Stage 1 with transformers: logp_q vs transformers re-scoring, the control
#   stage1/vllm        Stage 1 with vLLM (where installed): vLLM's logp_q vs transformers re-scoring, per token
#   trl/stage3         Stage 3 inside TRL: examples/trl_disa.py
#   trl/stage3-vllm    the same with --vllm (colocated vLLM), where vLLM is installed and the example has the flag
# Each row: status, wall time, tokens and tokens/s, peak GPU memory (nvidia-smi), and what the part shows.
# Writes bench/results/gpu_acceptance.md (override with --out); copy its table into bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import disa" 2>/dev/null && ! PYTHONPATH=src "$PYTHON" -c "import disa" 2>/dev/null; then
  echo "acceptance.sh: disa is not importable with $PYTHON (pip install -e '.[dev]', or set PYTHON=...)" >&2
  exit 2
fi
# The parts share a 540 s budget inside (--budget-s); this is the backstop.
exec timeout --signal=INT "${ACCEPTANCE_TIMEOUT_S:-590}" "$PYTHON" bench/gpu/acceptance.py "$@"

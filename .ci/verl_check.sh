#!/usr/bin/env bash
# CI step: veRL in its own virtual environment (it pins transformers<5.11, which the main environment must not
# be downgraded to), then our registered veRL estimator + policy loss run through veRL's own core_algos and
# actor loss path (verl.workers.utils.losses.ppo_loss) against our objective. Needs PyPI only; ~2-4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VERL_VENV:-.venv-verl}
if [ "${VERL_VENV_REUSE:-0}" != 1 ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first (the CPU wheel, so nothing pulls a CUDA build), then veRL with its "verl-core" extra (what
  # verl.trainer.ppo.ray_trainer imports: ray, fastapi, uvicorn, ...; no GPU package), then disa itself.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q 'verl[verl-core]>=0.9,<0.10' pytest
  "$VENV/bin/python" -m pip install -q -e .
fi
"$VENV/bin/python" -c "import verl, torch, transformers; print('veRL', verl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest -p no:cacheprovider -o addopts='' -q tests/verl_parity

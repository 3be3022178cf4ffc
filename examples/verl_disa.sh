#!/usr/bin/env bash
# DISA Stage 3 in veRL 0.9 on one 8-GPU node (not run in CI; see docs/engines.md). Needs `pip install disa[verl]`
# in the training environment and Stages 1-2 done (`disa sample/label/fit-z`, which wrote runs/disa/log_z/).
#   POLICY=/models/Qwen3-4B PROMPTS=prompts.jsonl bash examples/verl_disa.sh
set -euo pipefail
RUN=${RUN:-runs/disa}
BETA=$(python -c "import pyarrow.parquet as pq, json; print(json.loads(pq.read_schema('$RUN/log_z/table.parquet').metadata[b'disa'])['target']['beta'])")
KL_COEF=$(python -c "print(1 / $BETA)")
python examples/verl_prepare_data.py --prompts "$PROMPTS" --run "$RUN" --out "$RUN/verl/train.parquet"

# disa.integrations.verl registers adv_estimator / policy_loss "disa_tb" (the verl.plugins entry point loads it
# too; the variable makes it explicit). The KL-in-reward settings are what carry log pi_ref to the loss: keep them.
# disa_tb refuses actor.entropy_coeff != 0 and actor.use_kl_loss=True (they add non-TB terms) on its first call, and
# normalises itself over the global mini-batch as veRL 0.9's engine expects (any ppo_micro_batch_size_per_gpu).
VERL_USE_EXTERNAL_MODULES=disa.integrations.verl python -m verl.trainer.main_ppo \
  data.train_files="$RUN/verl/train.parquet" data.val_files="$RUN/verl/train.parquet" \
  data.train_batch_size=128 data.max_prompt_length=1024 data.max_response_length=4096 \
  actor_rollout_ref.model.path="$POLICY" \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=8 actor_rollout_ref.rollout.temperature=1.0 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.actor.ppo_mini_batch_size=64 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 actor_rollout_ref.actor.ppo_epochs=1 \
  actor_rollout_ref.actor.policy_loss.loss_mode=disa_tb actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.actor.entropy_coeff=0 \
  algorithm.adv_estimator=disa_tb algorithm.use_kl_in_reward=True algorithm.kl_penalty=kl \
  algorithm.kl_ctrl.type=fixed algorithm.kl_ctrl.kl_coef="$KL_COEF" \
  reward.custom_reward_function.path=examples/verl_disa_reward.py reward.custom_reward_function.name=compute_score \
  trainer.n_gpus_per_node=8 trainer.nnodes=1 trainer.total_epochs=1 trainer.logger='["console"]' \
  trainer.project_name=disa trainer.experiment_name=disa_tb "$@"

"""Where one ``disa``-objective RL step spends its time, phase by phase, on ``bench_trl_vs_disa.py``'s setup.

Same model, prompts, G, forced length and settings as that benchmark's ``disa-disa`` contender (gradient
checkpointing ``--grad-ckpt``, float32 unless ``--precision bf16``). Phases, seconds per step (median over the
steps after the first, a warm-up):

- *generation*: ``RLTrainer._generate`` (the sampler, exact log-probs recorded);
- *reward*: the reward function over the completions (``score_rewards``);
- *ref scoring*: ``RLTrainer._score`` on the frozen reference (``log pi_ref``, no grad);
- *rest of rollout*: the rest of ``collect_rollouts`` (advantages, padding, log Z lookup);
- *policy forward*: ``response_logprobs`` in the update (gradient kept); *loss*: ``compute_objective``;
- *optimizer*: ``optimizer_step`` (unscale, clip, AdamW); *backward*: the rest of ``update``.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/profile_disa_step.py --shape medium --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_trl_vs_disa as bench  # noqa: E402

PHASES = ("generation", "reward", "ref scoring", "rest of rollout", "policy forward", "loss", "backward", "optimizer")


def _timed(totals: dict, bucket: str, fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[bucket] = totals.get(bucket, 0.0) + time.perf_counter() - t

    return wrapper


def profile(shape_name: str, steps: int, objective: str = "disa") -> list[dict]:
    import copy

    import torch

    import disa.training.rl as rl_mod
    import disa.training.update as update_mod
    from disa.config import TargetConfig, TrainConfig
    from disa.stages.fit_z import LogZTable
    from disa.training import RLTrainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shape = bench.SHAPES[shape_name]
    tok = bench.build_tokenizer()
    model = bench.build_model(tok, shape)
    prompts = [{"id": str(i), "text": t} for i, t in enumerate(bench.prompt_texts())]
    ref = copy.deepcopy(model).eval() if objective == "disa" else None
    log_z = LogZTable({p["id"]: 0.0 for p in prompts}) if objective == "disa" else None
    config = TrainConfig(objective=objective, group_size=bench.GROUP, prompts_per_step=bench.PROMPTS, num_steps=steps,
                         max_new_tokens=shape["tokens"], lr=bench.LR, micro_batch_size=bench.PROMPTS * bench.GROUP,
                         mixed_precision="bf16" if bench.PRECISION == "bf16" else "no",
                         generation_batch_size=bench.PROMPTS, updates_per_batch=1, save_every=0, seed=0,
                         gradient_checkpointing=bench.grad_ckpt("disa"))
    totals: dict[str, float] = {}
    # module-level names the trainer calls through, wrapped where they are looked up
    rl_mod.score_rewards = _timed(totals, "reward", rl_mod.score_rewards)
    update_mod.response_logprobs = _timed(totals, "policy forward", update_mod.response_logprobs)
    update_mod.compute_objective = _timed(totals, "loss", update_mod.compute_objective)
    update_mod.optimizer_step = _timed(totals, "optimizer", update_mod.optimizer_step)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = RLTrainer(model, ref, tok, prompts, bench.reward_fn, config, output_dir=out_dir,
                            target=TargetConfig(beta=1.0, reward_transform="raw"), log_z_fn=log_z)
        trainer._generate = _timed(totals, "generation", trainer._generate)
        trainer._score = _timed(totals, "ref scoring" if objective == "disa" else "old scoring", trainer._score)
        trainer.collect_rollouts = _timed(totals, "rollout", trainer.collect_rollouts)
        trainer.update = _timed(totals, "update", trainer.update)
        rows = []
        for _ in range(steps):
            totals.clear()
            t = time.perf_counter()
            trainer.step()
            row = dict(totals, step=time.perf_counter() - t)
            row["rest of rollout"] = row["rollout"] - sum(row.get(k, 0.0) for k in ("generation", "reward", "ref scoring"))
            row["backward"] = row["update"] - sum(row.get(k, 0.0) for k in ("policy forward", "loss", "optimizer"))
            rows.append(row)
    return rows[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(bench.SHAPES), default="medium")
    ap.add_argument("--steps", type=int, default=4, help="steps; the first is a warm-up")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--grad-ckpt", choices=["on", "off"], default="off")
    ap.add_argument("--json", help="also write every step's phases here")
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is a warm-up)")
    bench.PRECISION, bench.GRAD_CKPT = args.precision, args.grad_ckpt
    rows = profile(args.shape, args.steps)
    step = statistics.median(r["step"] for r in rows)
    print(f"disa objective, shape {args.shape} {bench.SHAPES[args.shape]}, {args.precision}, gradient checkpointing "
          f"{args.grad_ckpt}, {len(rows)} counted steps; median s/step and share of the step")
    for phase in PHASES:
        sec = statistics.median(r.get(phase, 0.0) for r in rows)
        print(f"  {phase:<16} {sec:7.3f} s  {100 * sec / step:5.1f}%")
    print(f"  {'step':<16} {step:7.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "precision": args.precision, "grad_ckpt": args.grad_ckpt, "steps": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()

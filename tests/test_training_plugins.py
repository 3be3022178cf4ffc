"""Adding an objective or a log Z source is one new file outside the package, named in ``plugins:`` and used by
``disa train`` (policy gradient / group r~ here, so no Stage 1 artefact is needed)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import yaml

from disa import cli
from disa.verifiers import register_verifier

STEPS = 3


@register_verifier("test_plugins_digit")
def has_digit(prompts, completions, **columns):
    return [float(any(ch.isdigit() for ch in c)) for c in completions]


def write_config(tmp_path: Path, model: str, plugin: Path, **train) -> str:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?"}) + "\n" for i in range(4)))
    data = {
        "output_dir": str(tmp_path / "run"), "plugins": [str(plugin)],
        "data": {"prompts": str(prompts), "verifier": "test_plugins_digit"},
        "models": {"reference": model, "device": "cpu"},
        "target": {"beta": 2.0, "reward_transform": "group"},
        "sample": {"max_new_tokens": 8}, "eval": {"max_new_tokens": 8},
        "train": {"group_size": 4, "prompts_per_step": 2, "num_steps": STEPS, "micro_batch_size": 8,
                  "max_new_tokens": 8, "lr": 1e-2, "save_every": 0, "report_to": "none", **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def metrics_rows(tmp_path: Path) -> list[dict]:
    with (tmp_path / "run" / "checkpoints" / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_a_plugin_objective_gets_reference_logprobs_under_its_own_hyperparameter_name(tiny_gpt2_path, tmp_path):
    """Its KL weight is called ``anchor_strength``, not ``kl_coef``: the declaration, not the name, brings it
    ``ref_logp``. Step 1 samples from pi_ref itself, so ref_logp equals the policy's log-probs there; after an
    update they differ."""
    plugin = tmp_path / "anchored_pg.py"
    plugin.write_text(
        "from disa.objectives import ObjectiveNeeds, register_objective\n"
        "from disa.objectives.common import kl_to_reference, masked_mean\n"
        "SEEN = []\n"
        "@register_objective('anchored_pg', family='policy_gradient',\n"
        "                    needs=lambda hp: ObjectiveNeeds({'advantages', 'ref_logp'} if hp['anchor_strength'] > 0\n"
        "                                                    else {'advantages'}))\n"
        "def anchored_pg(*, logp, mask, advantages, ref_logp=None, anchor_strength: float = 0.0):\n"
        "    \"\"\"Policy gradient with a k3 KL anchor to pi_ref.\"\"\"\n"
        "    SEEN.append((anchor_strength, None if ref_logp is None else\n"
        "                 float(((ref_logp - logp.detach()).abs() * mask).max())))\n"
        "    pg = -(advantages[:, None] * logp * mask).sum() / mask.sum()\n"
        "    kl = masked_mean(kl_to_reference(logp, ref_logp), mask)\n"
        "    return pg + anchor_strength * kl, {'kl_anchor': kl.detach()}\n"
    )
    config = write_config(tmp_path, tiny_gpt2_path, plugin, objective="anchored_pg",
                          objective_kwargs={"anchor_strength": 0.5})
    assert cli.main(["train", "-c", config]) == 0
    seen = sys.modules["disa_plugin_anchored_pg"].SEEN
    assert len(seen) == STEPS and all(strength == 0.5 for strength, _ in seen)
    assert seen[0][1] < 1e-5  # pi_ref's log-probs of the same tokens, before any update
    assert seen[-1][1] > 1e-4  # the policy moved away from pi_ref; ref_logp did not
    rows = metrics_rows(tmp_path)
    assert len(rows) == STEPS and float(rows[0]["kl_anchor"]) < 1e-6 < float(rows[-1]["kl_anchor"])


def test_a_plugin_log_z_source_is_used_by_disa_train(tiny_gpt2_path, tmp_path):
    """A log Z source in one file: ``train.log_z: reward_scaled`` names it; every rollout's log Z is what it
    computed from the request (beta times its group's mean r~, plus 1), whatever the objective's own default."""
    plugin = tmp_path / "reward_scaled.py"
    plugin.write_text(
        "from disa.log_z import LogZSource, register_log_z_source\n"
        "CALLS = []\n"
        "@register_log_z_source('reward_scaled')\n"
        "class RewardScaled(LogZSource):\n"
        "    def rollout_log_z(self, request):\n"
        "        g = request.group_size\n"
        "        out = 1.0 + request.beta * request.rewards.view(-1, g).mean(dim=1).repeat_interleave(g)\n"
        "        CALLS.append(out.clone())\n"
        "        return out\n"
    )
    config = write_config(tmp_path, tiny_gpt2_path, plugin, objective="disa", log_z="reward_scaled")
    assert cli.main(["train", "-c", config]) == 0
    calls = sys.modules["disa_plugin_reward_scaled"].CALLS
    assert len(calls) == STEPS and all(c.shape == (8,) for c in calls)
    # group-normalised r~ has group mean 0, so every value is 1 + beta * 0 = 1 (up to float rounding)
    assert all(abs(float(c.max()) - 1.0) < 1e-5 and abs(float(c.min()) - 1.0) < 1e-5 for c in calls)
    rows = metrics_rows(tmp_path)
    assert [round(float(r["log_z_mean"]), 5) for r in rows] == [1.0] * STEPS

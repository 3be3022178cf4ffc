"""``disa train``: Stage 3 with ``train.objective``, reading its target from the Stage 1-2 artefacts.

What a run needs is decided by the objective's declaration (:mod:`disa.objectives.registry`), not by a list of
names here:

* trajectory balance: the target ``beta`` and ``r~`` are those the labels were made with (``labels.parquet``
  records them); a config that disagrees is refused. ``log Z`` comes from ``train.log_z``: the frozen
  per-prompt table of ``disa fit-z`` (the default for ``disa``), the regressor itself, the Stage 1 labels, a
  head learned with the policy (``flowrl``) or zero (``flowrl_no_logz``). Only what that needs is read, so
  ``flowrl`` with ``target.reward_transform: group`` needs no Stage 1 at all.
* policy gradient (GRPO, GSPO, ASPO): the verifier's raw reward; no Stage 1 artefact.
* supervised (``sft``): the proposal's reward-1 samples from ``disa sample``, with ``train.sft``.

Stage 1-2 files are read from ``stage1_dir`` when it is set, so a baseline trains from a DISA run's files and
writes its checkpoints into its own ``output_dir``.

The trainer receives its generator, verifier and ``log Z`` source from here (:func:`train_policy`), which the
demo calls too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from disa.config import ConfigError, PipelineConfig, TargetConfig, TrainConfig
from disa.objectives import get_spec
from disa.run_dir import RunDir, check_target
from disa.stages import common
from disa.stages.common import stage

# Fields that may change between a run and its resume (the run's length and bookkeeping, not its maths).
RESUMABLE_CHANGES = {"num_steps", "num_epochs", "save_every", "keep_checkpoints", "report_to", "eval_every"}


def check_resume(ckpt: Path, train: TrainConfig, target: Optional[TargetConfig]) -> None:
    """Refuse to continue ``ckpt`` with settings other than those it was trained with, naming each change."""
    old = json.loads((ckpt / "train_config.json").read_text())
    new = {"sft": train.sft.to_dict()} if target is None else train.to_dict()
    if ("sft" in old and len(old) == 1) != (target is None):
        kind = "an sft run" if "sft" in old and len(old) == 1 else "an RL run"
        raise ConfigError(f"{ckpt}: a checkpoint of {kind}, but train.objective is {train.objective!r}; "
                          "use another output_dir")
    flat_old, flat_new = _flatten(old), _flatten(new)
    if target is not None and (ckpt / "target.json").is_file():
        flat_old.update(_flatten({"target": json.loads((ckpt / "target.json").read_text())}))
        flat_new.update(_flatten({"target": target.to_dict()}))
    diff = [k for k in sorted(set(flat_old) | set(flat_new))
            if k.split(".")[-1] not in RESUMABLE_CHANGES and flat_old.get(k) != flat_new.get(k)]
    if diff:
        details = ", ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in diff)
        raise ConfigError(f"{ckpt} was trained with different settings ({details}); resuming would mix two runs: "
                          "use a new output_dir or delete the checkpoints folder")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "objective_kwargs" and k != "lora":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------- what RL reads
def needs_labels(cfg: PipelineConfig) -> bool:
    """Whether Stage 3 reads Stage 1's labels: a frozen log Z, or the frozen affine r~ of trajectory balance."""
    from disa.training import resolve_log_z_kind

    spec = get_spec(cfg.train.objective)
    if spec.family != "trajectory_balance":
        return False
    return resolve_log_z_kind(cfg.train.log_z, spec) == "frozen" or cfg.target.reward_transform == "affine"


def check_recorded_target(cfg: PipelineConfig, rd: RunDir) -> None:
    """Check the config's target against what ``labels.parquet`` (and ``log_z/``) were made with."""
    check_target(cfg.target, rd.labels_metadata()["target"], rd.labels)


def frozen_log_z(cfg: PipelineConfig, rd: RunDir, records) -> Callable:
    """The frozen ``log_z_fn`` that ``train.log_z`` names (``auto`` = the table of ``disa fit-z``)."""
    import pyarrow.parquet as pq

    from disa.stages.fit_z import FrozenLogZ, LogZTable, read_log_z_table

    source = "table" if cfg.train.log_z == "auto" else cfg.train.log_z
    ids = [r.id for r in records]
    if source == "labels":
        cols = pq.read_table(str(rd.labels), columns=["prompt_id", "log_z"]).to_pydict()
        values, where = dict(zip(cols["prompt_id"], cols["log_z"])), rd.labels
    elif source == "table":
        rd.require(rd.log_z_table, "fit-z", "the frozen log Z of every labelled prompt")
        values, meta = read_log_z_table(rd.log_z_table)
        if "target" in meta:
            check_target(cfg.target, meta["target"], rd.log_z_table)
        where = rd.log_z_table
    else:  # the regressor, applied to the prompts as rendered for pi_ref
        for name in ("model.safetensors", "config.json"):
            rd.require(rd.log_z / name, "fit-z", "the frozen log Z regressor")
        texts = common.reference_texts(cfg, records)
        try:
            frozen = FrozenLogZ(str(rd.log_z), common.embedder(cfg))
            values = dict(zip(ids, frozen([texts[i] for i in ids], ids).tolist()))
        except ValueError as e:
            raise ConfigError(f"{rd.log_z}: {e}; re-run `disa fit-z` with this fit_z.embedder") from None
        return LogZTable(values)
    missing = [i for i in ids if i not in values]
    if missing:
        raise ConfigError(f"{where}: no log Z for prompt id(s) {missing[:5]} of data.prompts; run `disa sample`, "
                          "`disa label` and `disa fit-z` on this prompt set (or set train.log_z: regressor)")
    return LogZTable({i: values[i] for i in ids})


def affine_map(rd: RunDir, records) -> dict[str, tuple[float, float]]:
    """``{prompt id: (scale, shift)}``: the frozen r~ = a r + b of each prompt, as ``disa label`` recorded it."""
    import pyarrow.parquet as pq

    cols = pq.read_table(str(rd.labels), columns=["prompt_id", "reward_scale", "reward_shift"]).to_pydict()
    affine = {pid: (a, b) for pid, a, b in zip(cols["prompt_id"], cols["reward_scale"], cols["reward_shift"])}
    missing = [r.id for r in records if r.id not in affine]
    if missing:
        raise ConfigError(f"{rd.labels}: no reward_scale/reward_shift for prompt id(s) {missing[:5]}; "
                          "run `disa sample` and `disa label` on data.prompts")
    return affine


def sft_examples(rd: RunDir, records, tokenizer) -> list[tuple[str, str]]:
    """(prompt rendered for the policy, response) for every Stage 1 sample with reward 1."""
    import pyarrow.parquet as pq

    from disa.data import render_prompt

    by_id = {r.id: r for r in records}
    examples, total = [], 0
    for shard in rd.complete_shards():
        cols = pq.read_table(shard, columns=["prompt_id", "response", "reward"]).to_pydict()
        total += len(cols["reward"])
        for pid, response, reward in zip(cols["prompt_id"], cols["response"], cols["reward"]):
            if reward >= 1.0 and response:
                if pid not in by_id:
                    raise ConfigError(f"{shard}: prompt id {pid!r} is not in data.prompts")
                examples.append((render_prompt(by_id[pid], tokenizer), response))
    if not examples:
        raise ConfigError(f"{rd.samples}: no reward-1 samples among {total} Stage 1 samples, so objective sft has "
                          "nothing to fine-tune on (use a stronger models.proposal, a larger sample.n, or easier prompts)")
    return examples


def training_records(cfg: PipelineConfig, records) -> list:
    """The prompts Stage 3 trains on: ``data.prompts`` less the held-out slice that ``disa eval`` selects
    checkpoints on (``eval.select_holdout``), so that selection never scores a prompt the policy trained on."""
    if not cfg.eval.select_holdout:
        return list(records)
    from disa import metrics

    try:
        held_out = set(metrics.held_out_slice([r.id for r in records], cfg.eval.select_holdout, seed=cfg.eval.seed))
    except ValueError as err:
        raise ConfigError(f"eval.select_holdout: {err}") from None
    if len(held_out) == len(records):
        raise ConfigError(f"eval.select_holdout: {len(held_out)} held-out prompts leave none of data.prompts to train on")
    common.say("train", f"{len(held_out)} prompts held out for checkpoint selection (eval.select_holdout)")
    return [r for r in records if r.id not in held_out]


# ----------------------------------------------------------------------------------------------- one call
def train_policy(policy, ref_model, tokenizer, prompts, reward_fn, train: TrainConfig, target: TargetConfig, *,
                 output_dir, log_z_fn=None, affine=None, sft_examples=None, generator=None, resume_from=None):
    """Train one policy with ``train.objective``: the one entry point of the pipeline and the demo.

    ``prompts``: dicts with ``id``, ``text`` and verifier columns. Returns ``(policy, history)``."""
    from disa.training import RLTrainer, train_sft

    if get_spec(train.objective).family == "supervised":
        return train_sft(policy, tokenizer, sft_examples, train.sft, output_dir=output_dir, resume_from=resume_from)
    trainer = RLTrainer(policy, ref_model, tokenizer, prompts, reward_fn, train, output_dir=output_dir, target=target,
                        affine=affine, log_z_fn=log_z_fn, generator=generator, resume_from=resume_from)
    history = trainer.train()
    return trainer.policy, history


@stage("train")
def run(cfg: PipelineConfig) -> dict:
    """``disa train``: Stage 3 -> ``checkpoints/`` (resumes from the newest checkpoint with the same settings)."""
    from disa.data import render_prompt

    rd = common.run_dir(cfg)  # where this run writes
    stage1 = common.stage1_run_dir(cfg)  # where it reads Stage 1-2 files (stage1_dir, else output_dir)
    records = training_records(cfg, common.prompts(cfg))
    spec = get_spec(cfg.train.objective)
    supervised = spec.family == "supervised"
    reward_fn = None if supervised else common.verifier(cfg)
    log_z_fn = affine = None
    if not supervised:
        from disa.training import resolve_log_z_kind

        try:
            kind = resolve_log_z_kind(cfg.train.log_z, spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if needs_labels(cfg):
            check_recorded_target(cfg, stage1)
        if kind == "frozen":
            log_z_fn = frozen_log_z(cfg, stage1, records)
        if spec.family == "trajectory_balance" and cfg.target.reward_transform == "affine":
            affine = affine_map(stage1, records)
    ckpt = common.existing_checkpoint(rd.checkpoints)
    if ckpt is not None:
        check_resume(ckpt, cfg.train, None if supervised else cfg.target)
    rd.ensure_writable()

    policy_path, ref_path = common.model_path(cfg, "policy"), common.model_path(cfg, "reference")
    policy, tokenizer = common.load_model(cfg, policy_path)
    examples = sft_examples(stage1, records, tokenizer) if supervised else None
    ref_model = generator = None
    if not supervised:
        if spec.needs_ref_logp(cfg.train.objective_kwargs) and not (cfg.train.lora is not None and policy_path == ref_path):
            ref_model = common.load_model(cfg, ref_path)[0]  # under LoRA from pi_ref, pi_ref = the adapter off
        generator = common.generator(cfg, policy, cfg.train.generation_batch_size, consumer="train", tokenizer=tokenizer,
                                     progress=False)
    prompts = [{**r.verifier_columns(), "id": r.id, "text": render_prompt(r, tokenizer)} for r in records]
    policy, history = train_policy(policy, ref_model, tokenizer, prompts, reward_fn, cfg.train, cfg.target,
                                   output_dir=str(rd.checkpoints), log_z_fn=log_z_fn, affine=affine,
                                   sft_examples=examples, generator=generator, resume_from=ckpt)
    final = common.existing_checkpoint(rd.checkpoints)
    del policy, ref_model, generator
    common.free()
    return _report(cfg, rd, history, ckpt, final, log_z_fn, examples)


def _report(cfg, rd, history, ckpt, final, log_z_fn, examples) -> dict:
    last = history[-1] if history else {}
    steps = int(last.get("step", 0)) if history else 0
    result = {"objective": cfg.train.objective, "steps": steps, "final_loss": last.get("loss", float("nan")),
              "checkpoint": str(final)}
    resumed = f" (resumed from {ckpt.name})" if ckpt is not None else ""
    if examples is not None:
        result["examples"] = len(examples)
        common.say("train", f"sft on {len(examples)} reward-1 samples, {len(history)} steps{resumed} -> {final}; "
                   f"final loss {result['final_loss']:.4g}")
        return result
    result["final_reward"] = last.get("reward_mean", float("nan"))
    if log_z_fn is not None:
        result["mean_frozen_log_z"] = sum(log_z_fn.values.values()) / len(log_z_fn.values)
    resumed = f" (resumed at step {int(ckpt.name.split('-')[-1])})" if ckpt is not None else ""
    common.say("train", f"{cfg.train.objective}, {steps} steps{resumed} -> {final}; final reward "
               f"{result['final_reward']:.4f}, loss {result['final_loss']:.4g}; metrics in "
               f"{rd.checkpoints / 'metrics.csv'}")
    return result

"""``disa train``: Stage 3 with ``train.objective``, reading its target from the Stage 1-2 artefacts.

What a run needs is decided by the objective's declaration (:mod:`disa.objectives.registry`), not by a list of
names here:

* trajectory balance: the target ``beta`` and ``r~`` are those the labels were made with (``labels.parquet``
  records them); a config that disagrees is refused. ``log Z`` comes from ``train.log_z``: the frozen
  per-prompt table of ``disa fit-z`` (the default for ``disa``), the regressor itself, the Stage 1 labels, a
  head learned with the policy (``flowrl``), zero (``flowrl_no_logz``) or any source of ``disa.log_z`` (each
  declares the run artefacts it reads, and builds itself from them). Only what that needs is read, so
  ``flowrl`` with ``target.reward_transform: group`` needs no Stage 1 at all.
* policy gradient (GRPO, GSPO, ASPO): the verifier's raw reward; no Stage 1 artefact.
* supervised (``sft``): the proposal's reward-1 samples from ``disa sample``, with ``train.sft``.

Stage 1-2 files are read from ``stage1_dir`` when it is set, so a baseline trains from a DISA run's files and
writes its checkpoints into its own ``output_dir``.

The trainer receives its rollout engine, verifier and ``log Z`` source from here (:func:`train_policy`), which
the demo calls too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from disa.config import ConfigError, PipelineConfig, TargetConfig, TrainConfig
from disa.objectives import get_spec
from disa.run_dir import RunDir, check_target
from disa.stages import common
from disa.artifacts import reads_labels
from disa.stages.common import stage

# Fields that may change between a run and its resume (the run's length and bookkeeping, not its maths).
RESUMABLE_CHANGES = {"num_steps", "num_epochs", "save_every", "keep_checkpoints", "report_to", "eval_every"}


def check_resume(ckpt: Path, train: TrainConfig, target: Optional[TargetConfig]) -> None:
    """Refuse to continue ``ckpt`` with settings other than those it was trained with, naming each change."""
    from disa.artifacts import read_json

    old = read_json(ckpt / "train_config.json", "train")
    new = {"sft": train.sft.to_dict()} if target is None else train.to_dict()
    if ("sft" in old and len(old) == 1) != (target is None):
        kind = "an sft run" if "sft" in old and len(old) == 1 else "an RL run"
        raise ConfigError(f"{ckpt}: a checkpoint of {kind}, but train.objective is {train.objective!r}; "
                          "use another output_dir")
    flat_old, flat_new = _flatten(old), _flatten(new)
    if target is not None and (ckpt / "target.json").is_file():
        flat_old.update(_flatten({"target": read_json(ckpt / "target.json", "train")}))
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
def log_z_entry(cfg: PipelineConfig):
    """The registered log Z source ``train.log_z`` names for this objective (None: it reads none)."""
    from disa.log_z import resolve_log_z_source

    return resolve_log_z_source(cfg.train.log_z, get_spec(cfg.train.objective))


def needs_labels(cfg: PipelineConfig) -> bool:
    """Whether Stage 3 reads Stage 1's labels: a log Z source that declares it, or the frozen affine r~."""
    if get_spec(cfg.train.objective).family != "trajectory_balance":
        return False
    return "labels" in log_z_entry(cfg).requires or cfg.target.reward_transform == "affine"


def check_recorded_target(cfg: PipelineConfig, rd: RunDir) -> None:
    """Check the config's target against what ``labels.parquet`` (and ``log_z/``) were made with."""
    check_target(cfg.target, rd.labels_metadata()["target"], rd.labels)


def refuse_bad_numbers(values: dict, where, what: str) -> None:
    """Refuse NaN, infinite or absurd (|x| > 1e6) per-prompt values before step 1, naming the prompt ids: one
    such value makes every step that draws its prompt a non-finite loss (skipped without a word)."""
    from disa.artifacts import non_finite_or_huge

    bad = non_finite_or_huge(values)
    if bad:
        shown = ", ".join(f"{i!r} ({values[i]})" for i in bad[:5])
        raise ConfigError(f"{where}: {what} is NaN, infinite or beyond 1e6 in magnitude for {len(bad)} prompt(s): "
                          f"{shown}{' ...' if len(bad) > 5 else ''}; the file is damaged or its labels overflowed: "
                          "re-run the stage that writes it")


def affine_map(rd: RunDir, records) -> dict[str, tuple[float, float]]:
    """``{prompt id: (scale, shift)}``: the frozen r~ = a r + b of each prompt, as ``disa label`` recorded it."""
    import pyarrow.parquet as pq

    from disa.artifacts import LABELS

    cols = LABELS.read_parquet(rd.root, ["prompt_id", "reward_scale", "reward_shift"]).to_pydict()
    affine = {pid: (a, b) for pid, a, b in zip(cols["prompt_id"], cols["reward_scale"], cols["reward_shift"])}
    missing = [r.id for r in records if r.id not in affine]
    if missing:
        raise ConfigError(f"{rd.labels}: no reward_scale/reward_shift for prompt id(s) {missing[:5]}; "
                          "run `disa sample` and `disa label` on data.prompts")
    refuse_bad_numbers({r.id: affine[r.id] for r in records}, rd.labels, "the affine r~ map (reward_scale, reward_shift)")
    return affine


def sft_examples(rd: RunDir, records, tokenizer) -> list[tuple[str, str]]:
    """(prompt rendered for the policy, response) for every Stage 1 sample with reward 1."""
    import pyarrow.parquet as pq

    from disa.artifacts import reading
    from disa.data import render_prompt

    by_id = {r.id: r for r in records}
    examples, total = [], 0
    for shard in rd.complete_shards():
        with reading(shard, "sample"):
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


# ----------------------------------------------------------------------------------------------- resume guards
def training_lineage(cfg: PipelineConfig, rd: RunDir, stage1: RunDir, records) -> "Lineage":
    """What this run trains on: the models' digests, the dtype, the prompt texts and ids it trains on, the
    held-out slice, and the digest of every Stage 1-2 file it reads (paths relative to the run folder)."""
    from disa.artifacts import (LABELS, LOG_Z_TABLE, REGRESSOR, SAMPLES, Lineage, prompts_digest, reads_labels,
                                reads_log_z_table, reads_regressor, relative, text_digest, trains_on_samples)
    from disa.run_dir import model_fingerprint

    fields = {
        "models.policy": model_fingerprint(common.model_path(cfg, "policy")),
        "models.reference": model_fingerprint(common.model_path(cfg, "reference")),
        "models.dtype": cfg.models.dtype,
        "data.prompts (prompt texts)": prompts_digest(records),
        "training prompt ids": text_digest(r.id for r in records),
        "eval.select_holdout": cfg.eval.select_holdout,
    }
    for artifact, needed in ((SAMPLES, trains_on_samples), (LABELS, reads_labels), (LOG_Z_TABLE, reads_log_z_table),
                             (REGRESSOR, reads_regressor)):
        if needed(cfg):
            fields[artifact.display] = {"path": relative(artifact.path(stage1.root), rd.root),
                                        "digest": artifact.digest(stage1.root)}
    return Lineage(fields)


def preflight(cfg: PipelineConfig, rd: RunDir, stage1: RunDir, records, ckpt: Optional[Path], supervised: bool):
    """Before any model loads: refuse a resume whose inputs differ from those the checkpoint recorded (naming each
    field and both values), a ``train.num_steps`` below the checkpoint's step, a damaged ``trainer_state.json``;
    rebuild ``metrics.csv`` from the checkpoint. Returns this run's lineage (:func:`record_lineage`)."""
    from disa.artifacts import LINEAGE_FILE, Lineage, read_json, refuse_differences
    from disa.training.checkpoints import checkpoint_step, read_trainer_state, rewrite_metrics

    lineage = training_lineage(cfg, rd, stage1, records)
    if ckpt is not None:
        recorded = next((p for p in (ckpt / LINEAGE_FILE, rd.checkpoints / LINEAGE_FILE) if p.is_file()), None)
        if recorded is not None:
            refuse_differences(Lineage.from_dict(read_json(recorded, "train")), lineage, ckpt,
                               "resuming would mix two runs: use a new output_dir, or delete the checkpoints folder")
        state = read_trainer_state(ckpt)
        step = checkpoint_step(ckpt)
        if not supervised and step is not None and step > cfg.train.num_steps:
            raise ConfigError(f"train.num_steps: {cfg.train.num_steps}, but {ckpt} is already at step {step}; a run "
                              f"does not train backwards: set train.num_steps >= {step} to continue it, or use another "
                              "output_dir for a shorter run")
        if not supervised and step == cfg.train.num_steps:
            common.say("train", f"{ckpt.name} is already at train.num_steps = {step}: nothing to train (raise "
                                "train.num_steps to continue)")
        rewrite_metrics(rd.checkpoints, state["history"])
    return lineage


def sweep_checkpoint_temporaries(rd: RunDir) -> list[Path]:
    """Delete the half-written ``checkpoints/.tmp-checkpoint-<step>/`` folders a killed run left (every one is
    stale: only the holder of this folder's `disa train` lock writes checkpoints here)."""
    import shutil

    from disa.training.checkpoints import CHECKPOINT_PREFIX

    stale = sorted(rd.checkpoints.glob(f".tmp-{CHECKPOINT_PREFIX}*")) if rd.checkpoints.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def settings_cannot_learn(cfg: PipelineConfig) -> list[str]:
    """Settings under which the policy can learn nothing (refused by :mod:`disa.stages.validate` before any model
    loads): a group statistic over groups of one."""
    spec = get_spec(cfg.train.objective)
    if cfg.train.group_size == 1 and (spec.family == "policy_gradient" or cfg.target.reward_transform == "group"):
        return [f"train.group_size: 1, but {cfg.train.objective} with r~ {cfg.target.reward_transform} uses a group "
                "statistic (a reward minus its group's mean): every advantage is 0 and the policy cannot learn; use "
                "group_size >= 2"]
    return []


def record_lineage(rd: RunDir, lineage) -> None:
    """``checkpoints/lineage.json``, written once training starts; every checkpoint takes a copy of it."""
    from disa.artifacts import LINEAGE_FILE
    from disa.io import atomic_write_json

    atomic_write_json(rd.checkpoints / LINEAGE_FILE, lineage.to_dict())


# ----------------------------------------------------------------------------------------------- one call
def train_policy(policy, ref_model, tokenizer, prompts, reward_fn, train: TrainConfig, target: TargetConfig, *,
                 output_dir, log_z=None, affine=None, engine=None, resume_from=None):
    """Train one policy with the RL objective ``train.objective``: the one entry point of the pipeline and the
    demo. ``prompts``: dicts with ``id``, ``text`` and verifier columns; ``log_z``: the ``disa.log_z`` source
    when it reads run artefacts. Returns ``(policy, history)``; SFT is :func:`disa.training.train_sft`."""
    from disa.training import RLTrainer

    trainer = RLTrainer(policy, ref_model, tokenizer, prompts, reward_fn, train, output_dir=output_dir, target=target,
                        affine=affine, log_z=log_z, engine=engine, resume_from=resume_from)
    history = trainer.train()  # warns as it goes when a window of steps cannot learn (training.rl)
    return trainer.policy, history


@stage("train")
def run(cfg: PipelineConfig) -> dict:
    """``disa train``: Stage 3 -> ``checkpoints/`` (resumes from the newest checkpoint with the same settings)."""
    from disa.data import render_prompt
    from disa.log_z import LogZContext
    from disa.objectives import bind_objective

    rd = common.run_dir(cfg)  # where this run writes
    stage1 = common.stage1_run_dir(cfg)  # where it reads Stage 1-2 files (stage1_dir, else output_dir)
    records = training_records(cfg, common.prompts(cfg))
    spec = get_spec(cfg.train.objective)
    supervised = spec.family == "supervised"
    reward_fn = None if supervised else common.verifier(cfg)
    log_z = affine = entry = None
    if not supervised:
        try:
            entry = log_z_entry(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if reads_labels(cfg):
            check_recorded_target(cfg, stage1)
        if entry is not None and entry.requires:
            log_z = entry.cls.from_run(LogZContext(train=cfg.train, pipeline=cfg, run_dir=stage1, records=records))
        if spec.family == "trajectory_balance" and cfg.target.reward_transform == "affine":
            affine = affine_map(stage1, records)
    ckpt = common.existing_checkpoint(rd.checkpoints)
    if ckpt is not None:
        check_resume(ckpt, cfg.train, None if supervised else cfg.target)
    rd.ensure_writable()
    lineage = preflight(cfg, rd, stage1, records, ckpt, supervised)
    sweep_checkpoint_temporaries(rd)

    policy_path, ref_path = common.model_path(cfg, "policy"), common.model_path(cfg, "reference")
    policy, tokenizer = common.load_model(cfg, policy_path)
    if supervised:
        from disa.training import train_sft

        examples = sft_examples(stage1, records, tokenizer)
        policy, history = train_sft(policy, tokenizer, examples, cfg.train.sft, output_dir=str(rd.checkpoints),
                                    resume_from=ckpt)
        final = common.existing_checkpoint(rd.checkpoints)
        del policy
        common.free()
        return _report(cfg, rd, history, ckpt, final, None, examples)
    ref_model = None
    needs = bind_objective(cfg.train.objective, cfg.train.objective_kwargs).needs
    if "ref_logp" in needs.inputs and not (cfg.train.lora is not None and policy_path == ref_path):
        ref_model = common.load_model(cfg, ref_path)[0]  # under LoRA from pi_ref, pi_ref = the adapter off
    engine = common.generator(cfg, policy, cfg.train.generation_batch_size, consumer="train", tokenizer=tokenizer,
                             progress=False)
    prompts = [{**r.verifier_columns(), "id": r.id, "text": render_prompt(r, tokenizer)} for r in records]
    record_lineage(rd, lineage)
    policy, history = train_policy(policy, ref_model, tokenizer, prompts, reward_fn, cfg.train, cfg.target,
                                   output_dir=str(rd.checkpoints), log_z=log_z, affine=affine, engine=engine,
                                   resume_from=ckpt)
    final = common.existing_checkpoint(rd.checkpoints)
    del policy, ref_model, engine
    common.free()
    return _report(cfg, rd, history, ckpt, final, log_z, None)


def _report(cfg, rd, history, ckpt, final, log_z, examples) -> dict:
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
    from disa.log_z import LogZTable

    if isinstance(log_z, LogZTable) and log_z.values:
        result["mean_frozen_log_z"] = sum(log_z.values.values()) / len(log_z.values)
    resumed = f" (resumed at step {int(ckpt.name.split('-')[-1])})" if ckpt is not None else ""
    common.say("train", f"{cfg.train.objective}, {steps} steps{resumed} -> {final}; final reward "
               f"{result['final_reward']:.4f}, loss {result['final_loss']:.4g}; metrics in "
               f"{rd.checkpoints / 'metrics.csv'}")
    return result

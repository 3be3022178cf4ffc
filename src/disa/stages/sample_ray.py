"""Stage 1 on Ray: the prompt shards fan out as Ray tasks, each writing the same shard file as ``disa sample``.

The files, the seeds and the resume guarantee are those of :mod:`disa.stages.sample`: shard ``k`` covers
prompts ``[k * shard_size, (k + 1) * shard_size)``, draws with seed ``seed + k``, and is written to a
temporary file then renamed, so it either holds all its rows or does not exist. A task is one shard; a
worker process builds its models once (``build_models``, a picklable zero-argument callable) and keeps them
for the shards it runs next, so a cluster holds one model per GPU (``num_gpus_per_task=1``; vLLM with tensor
parallelism asks for ``tensor_parallel_size`` GPUs).

A worker killed mid-shard (OOM, pre-emption, a lost node) leaves at most a ``*.tmp*`` file; Ray re-runs the
task on another worker (``max_retries``) and the rename makes the redo the only copy: no row is lost or
duplicated. If retries run out the driver raises naming the shards; running it again resumes. ``out_dir``
must be on a filesystem every node sees (NFS, a shared volume); the driver checks ``meta.json`` there
before any task starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from disa.data import PromptRecord
from disa.io import atomic_write_parquet
from disa.stages.sample import check_prompt_list, plan_sampling, sample_shard, shard_path
from disa.verifiers import resolve_verifier


@dataclass
class ShardModels:
    """What one worker samples and scores with (``sample_shard``'s model arguments)."""

    generator: Any
    ref_model: Any
    ref_tokenizer: Any
    proposal_model: Any = None
    proposal_tokenizer: Any = None
    logprobs_are_sampled: bool = False  # the generator's log-probs are the sampled distribution's (vLLM processed)


_WORKER_MODELS: dict[str, ShardModels] = {}  # per worker process: models built once, reused across its shards


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("sample.executor='ray' needs Ray: pip install 'disa[ray]'") from exc
    return ray


def run_shard(job: dict, k: int, records: Sequence[PromptRecord]) -> int:
    """One Ray task: sample, verify and score shard ``k`` and write its file; returns its row count."""
    models = _WORKER_MODELS.get(job["models_key"])
    if models is None:
        _WORKER_MODELS.clear()  # one set of models per worker: a new run's replace the last run's
        models = _WORKER_MODELS[job["models_key"]] = job["build_models"]()
    table = sample_shard(
        records, generator=models.generator, n=job["n"], verifier=resolve_verifier(job["verifier"]),
        ref_model=models.ref_model, ref_tokenizer=models.ref_tokenizer, proposal_model=models.proposal_model,
        proposal_tokenizer=models.proposal_tokenizer, gen_kwargs=job["gen_kwargs"], seed=job["seed"] + k,
        score_batch_size=job["score_batch_size"], verifier_kwargs=job["verifier_kwargs"],
        logprobs_are_sampled=models.logprobs_are_sampled,
    )
    atomic_write_parquet(table, shard_path(job["out_dir"], k))
    return table.num_rows


def run_sampling_ray(
    prompts: Sequence[PromptRecord],
    *,
    build_models: Callable[[], ShardModels],
    n: int,
    out_dir: str,
    verifier: Union[str, Callable],
    shard_size: int = 64,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Optional[Sequence[str]] = None,
    seed: int = 0,
    score_batch_size: int = 8,
    verifier_kwargs: Optional[dict] = None,
    extra_meta: Optional[dict] = None,
    num_gpus_per_task: float = 0,
    num_cpus_per_task: float = 1,
    max_retries: int = 3,
    ray_address: Optional[str] = None,
) -> dict:
    """``run_sampling`` with one Ray task per missing shard. Returns ``{"shards", "written", "skipped", "rows"}``.

    Joins ``ray_address`` (None or '': the running session, else a new local one). ``verifier`` is a registry
    name or a picklable reward function.
    """
    ray = _import_ray()
    check_prompt_list(prompts, shard_size, n)
    verifier_name = resolve_verifier(verifier).name  # an unknown name fails here, before the cluster works
    gen_kwargs, num_shards, pending, skipped, rows = plan_sampling(
        prompts, out_dir=out_dir, n=n, shard_size=shard_size, seed=seed, verifier_name=verifier_name,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
        extra_meta={"generator": "ray", **(extra_meta or {})},
    )
    if not pending:
        return {"shards": num_shards, "written": 0, "skipped": skipped, "rows": rows}

    if not ray.is_initialized():
        ray.init(address=ray_address or None)
    job = {"build_models": build_models, "models_key": f"{out_dir}:{id(build_models)}", "verifier": verifier,
           "n": n, "gen_kwargs": gen_kwargs, "seed": seed, "score_batch_size": score_batch_size,
           "verifier_kwargs": verifier_kwargs, "out_dir": out_dir}
    task = ray.remote(run_shard).options(num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task,
                                         max_retries=max_retries)
    job_ref = ray.put(job)
    refs = {task.remote(job_ref, k, records): k for k, records in pending}
    failed, written = [], 0
    for ref, k in refs.items():
        try:
            rows += ray.get(ref)
            written += 1
        except Exception as exc:  # noqa: BLE001 - every shard is collected before reporting
            failed.append((k, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    if failed:
        detail = "; ".join(f"shard {k}: {why}" for k, why in failed[:5])
        raise RuntimeError(f"{len(failed)} of {len(pending)} shard task(s) failed ({detail}); the {written} "
                           "finished shards are kept: run again to resume")
    return {"shards": num_shards, "written": written, "skipped": skipped, "rows": rows}


@dataclass
class ConfigModels:
    """``build_models`` for ``disa sample`` with ``sample.executor=ray``: each worker loads the config's models."""

    config: dict

    def __call__(self) -> ShardModels:
        from disa.config import PipelineConfig
        from disa.plugins import load_plugins
        from disa.stages import common

        cfg = PipelineConfig.from_dict(self.config)
        load_plugins(cfg.plugins)  # a user's verifier or objective lives there
        s = cfg.sample
        ref_path, proposal_path = common.model_path(cfg, "reference"), common.model_path(cfg, "proposal")
        from disa.generation.hf import HFGenerator
        from disa.stages.sample import proposal_generator

        generator, log_q_source = proposal_generator(cfg, proposal_path, progress=False)  # where log q comes from
        if proposal_path == ref_path and isinstance(generator, HFGenerator):
            return ShardModels(generator, generator.model, generator.tokenizer, **log_q_source)
        ref_model, ref_tokenizer = common.load_model(cfg, ref_path)
        return ShardModels(generator, ref_model, ref_tokenizer, **log_q_source)


def run_with_config(cfg, rd, records, ref_path: str, proposal_path: str) -> dict:
    """``disa sample`` with ``sample.executor=ray``: one task per shard, one model per GPU when the cluster has
    GPUs (as many as the engine declares: ``tensor_parallel_size`` for vLLM, none for a server), each worker loading the config's models."""
    from disa.config import ConfigError
    from disa.stages import common
    from disa.stages.sample import ResumeMismatch, sample_lineage

    ray = _import_ray()
    s = cfg.sample
    if not ray.is_initialized():
        ray.init(address=s.ray_address or None)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    from disa.generation.registry import check_options, engine_class

    engine = s.generation.engine
    gpus = engine_class(engine).devices_per_worker(check_options(engine, s.generation.options)) if has_gpus else 0
    fingerprints = sample_lineage(cfg, ref_path, proposal_path)
    isolation = common.code_isolation(cfg, [cfg.data.verifier], "sample")
    if isolation:  # this machine's; each worker refuses the fallback itself unless it is allowed
        fingerprints["code_isolation"] = isolation
    try:
        result = run_sampling_ray(
            records, build_models=ConfigModels(cfg.to_dict()), n=s.n, out_dir=str(rd.root),
            verifier=cfg.data.verifier, shard_size=s.shard_size, max_new_tokens=s.max_new_tokens,
            temperature=s.temperature, top_p=s.top_p, stop=s.stop, seed=s.seed, score_batch_size=s.batch_size,
            verifier_kwargs=common.verifier_kwargs(cfg, cfg.data.verifier), extra_meta=fingerprints,
            num_gpus_per_task=gpus,
        )
    except ResumeMismatch as e:
        raise ConfigError(str(e)) from None
    common.say("sample", f"{result['rows']} rows in {result['shards']} shard(s) on Ray ({result['written']} "
               f"written, {result['skipped']} already there; {gpus} GPU(s) per task) -> {rd.samples}")
    return result

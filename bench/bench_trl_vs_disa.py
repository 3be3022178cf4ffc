"""Stage 3 step time: TRL's ``GRPOTrainer`` against ``disa.training.RLTrainer`` on the same work.

Same randomly initialised GPT-2, same prompts, 8 prompts x G = 8 rollouts per step, a forced response length,
one optimiser step per rollout batch, float32 on the CPU (``--precision bf16``: bf16 autocast
in both, TRL's own default), one thread. Gradient checkpointing: TRL's default is on, disa's off; ``--grad-ckpt
on|off`` sets it alike in both (``defaults``, the default, keeps each side's). ``disa`` runs twice: objective
``grpo`` (the same loss family as TRL's) and ``disa`` (trajectory balance with a frozen log Z, here a
``LogZTable`` of zeros; it also scores ``log pi_ref`` under a frozen copy of the initial model). TRL also runs
twice: ``trl`` with ``beta=0`` (no KL: TRL builds no reference model) and ``trl-kl`` with ``beta=0.04`` (its KL
term: a frozen reference loaded from the same weights, scored with one no-grad forward per step), the
like-for-like contender of ``disa-disa``.

``--lengths forced`` (default): the tokenizer's EOS id is one past the model's vocabulary, so neither sampler can
ever draw it and every rollout is exactly ``--tokens`` long (checked after each run). ``--lengths variable``: EOS is
in the vocabulary with its logit lifted by real weights, mean completion about a third of the cap; each side's
completion lengths and its real / computed positions in the scoring and training forwards are reported. Both
trainers see the same model weights (seeded), the same prompts and the same reward function. Each phase is timed
on the wall clock and on the process's CPU clock (one thread: an idle machine's wall time, whatever the load).

Each (round, contender) runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own; rounds
interleave the contenders (order rotating), so load from other jobs on the machine hits all of them alike.
Per contender and step: *rollout* (the sampler), *scoring* (everything between sampling and the update:
rewards, the no-grad log-prob passes), *update* (forward + backward + optimiser step). The first step of a
run is a warm-up and is not counted.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_trl_vs_disa.py --shape tiny --rounds 3 --steps 4
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_trl_vs_disa.py --contenders trl-kl,disa-disa \
        --grad-ckpt off --lengths variable --precision fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

from worker import run_worker

# eos_weight: the --lengths variable model's EOS logit scale (see build_model), set so that the mean completion
# is about a third of the cap (measured: both sides' lengths are in each run's output)
SHAPES = {"tiny": dict(n_layer=4, n_embd=128, n_head=4, tokens=24, eos_weight=0.42),
          "medium": dict(n_layer=6, n_embd=512, n_head=8, tokens=64, eos_weight=0.30)}
CONTENDERS = ("trl", "trl-kl", "disa-grpo", "disa-disa")
KL_BETA = 0.04  # trl-kl: GRPOConfig(beta=KL_BETA), so TRL builds a frozen reference model and scores it every step
PROMPTS, GROUP, VOCAB = 8, 8, 512
LR = 1e-5
PRECISION = "fp32"  # --precision; TRL's GRPOConfig defaults to bf16 autocast, so it is set in both alike
# --grad-ckpt: TRL's GRPOConfig defaults to gradient checkpointing (recompute activations in backward), disa's
# TrainConfig does not; "defaults" keeps each side's default, "on" / "off" sets both alike
GRAD_CKPT = "defaults"
LENGTHS = "forced"  # --lengths: forced (EOS unreachable, every completion --tokens long) or variable (EOS reachable)


def grad_ckpt(side: str) -> bool:
    if GRAD_CKPT == "defaults":
        return side == "trl"
    return GRAD_CKPT == "on"


def build_tokenizer():
    """A byte-level BPE of ``VOCAB - 1`` pieces plus an EOS the model cannot emit (id ``VOCAB - 1``... see
    ``build_model``: the model's vocabulary stops before it). The pad id is an ordinary piece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [" ".join(f"{a} plus {b} is {a + b}" for b in range(40)) for a in range(40)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.add_special_tokens(["<eos>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>")
    tok.padding_side = "left"
    return tok


def build_model(tok, shape: dict):
    """The seeded GPT-2. ``forced``: its vocabulary stops before the EOS id, so no sampler can draw it.
    ``variable``: EOS is in the vocabulary and its logit is lifted by real weights (the final layer norm's bias
    on coordinate 0 and EOS's tied embedding on that coordinate alone), so completions end at a rate that puts
    their mean near a third of the cap, with a geometric-like spread, the same for every sampler."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tok.eos_token_id
    vocab = eos + 1 if LENGTHS == "variable" else eos
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=shape["n_embd"], n_layer=shape["n_layer"],
                        n_head=shape["n_head"], bos_token_id=tok.pad_token_id, eos_token_id=eos,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if LENGTHS == "variable":
        with torch.no_grad():
            model.transformer.ln_f.bias[0] = 10.0
            model.transformer.wte.weight[eos] = 0.0
            model.transformer.wte.weight[eos, 0] = shape["eos_weight"]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def prompt_texts() -> list[str]:
    return [f"{a} plus {a + 3} is" for a in range(PROMPTS)]


def reward_fn(prompts, completions, **_):
    """A cheap deterministic reward with spread inside each group: the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def clocks() -> tuple[float, float]:
    """(wall, this process's CPU time) in seconds. On a shared machine the CPU time of a one-thread process is
    what an idle machine's wall time would be, give or take cache effects; its wall time is mostly the queue."""
    return time.perf_counter(), time.process_time()


class PhaseTimer:
    """Wraps bound methods of a trainer and adds their wall time (``bucket``) and CPU time (``cpu_bucket``)
    into named buckets."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def step_row(self, wall: float, cpu: float) -> dict:
        """A step's phases: rollout, scoring (rollout+scoring minus rollout), update, step; wall and CPU."""
        row = {}
        for prefix in ("", "cpu_"):
            t = self.totals
            gs = t.get(prefix + "rollout+scoring", 0.0)
            row[prefix + "rollout"] = t.get(prefix + "rollout", 0.0)
            row[prefix + "scoring"] = gs - t.get(prefix + "rollout", 0.0)
            row[prefix + "step"] = wall if prefix == "" else cpu
            row[prefix + "update"] = t[prefix + "update"] if prefix + "update" in t else row[prefix + "step"] - gs
        return row

    def wrap(self, obj, name: str, bucket: str):
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            wall, cpu = clocks()
            try:
                return inner(*args, **kwargs)
            finally:
                wall2, cpu2 = clocks()
                self.totals[bucket] = self.totals.get(bucket, 0.0) + wall2 - wall
                self.totals["cpu_" + bucket] = self.totals.get("cpu_" + bucket, 0.0) + cpu2 - cpu

        setattr(obj, name, timed)


def run_trl(shape: dict, steps: int, out_dir: str, beta: float = 0.0) -> tuple[list[dict], dict]:
    """TRL's ``GRPOTrainer``; ``beta > 0`` adds its KL term, so every step also scores ``log pi_ref`` (one no-grad
    forward of a frozen reference model over prompt + completion, LM head at completion positions only)."""
    import torch
    from datasets import Dataset
    from transformers import GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    tok = build_tokenizer()
    model = build_model(tok, shape)
    if beta > 0:
        # TRL builds its reference with from_pretrained(model.config._name_or_path): save the seeded model and
        # reload it, so policy and reference start from these exact weights
        path = os.path.join(out_dir, "init_model")
        model.save_pretrained(path)
        model = GPT2LMHeadModel.from_pretrained(path)
    data = Dataset.from_list([{"prompt": p} for p in prompt_texts()])
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        max_completion_length=shape["tokens"], beta=beta, num_iterations=1, learning_rate=LR, max_steps=steps,
        gradient_accumulation_steps=1, temperature=1.0, top_p=1.0, top_k=0, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=1, bf16=PRECISION == "bf16", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        gradient_checkpointing=grad_ckpt("trl"),
    )
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=data, processing_class=tok)
    if (trainer.ref_model is not None) != (beta > 0):
        raise SystemExit(f"trl: beta={beta} but ref_model is {type(trainer.ref_model).__name__}")
    timer, steps_out = PhaseTimer(), []
    timer.wrap(trainer, "_generate", "rollout")
    timer.wrap(trainer, "_generate_and_score_completions", "rollout+scoring")
    inner_step = trainer.training_step
    lengths: list[int] = []

    def step(model, inputs, *a, **k):
        timer.totals.clear()
        wall, cpu = clocks()
        loss = inner_step(model, inputs, *a, **k)
        wall2, cpu2 = clocks()
        steps_out.append(timer.step_row(wall2 - wall, cpu2 - cpu))
        return loss

    trainer.training_step = step
    original = trainer._generate_and_score_completions

    tally = {"real": 0, "computed": 0}

    def record_lengths(*a, **k):
        out = original(*a, **k)
        lengths.extend(out["completion_mask"].sum(dim=1).tolist())
        # TRL's forwards (reference scoring, policy forward) run over prompt + completion, both padded to the
        # batch's longest
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        tally["real"] += int(mask.sum())
        tally["computed"] += mask.numel()
        return out

    trainer._generate_and_score_completions = record_lengths
    rss0 = rss_mb()
    trainer.train()
    return steps_out, {"rss_before_train_mb": rss0, "lengths": [int(x) for x in lengths],
                       "real_over_computed": tally["real"] / tally["computed"]}


def run_disa(shape: dict, steps: int, out_dir: str, objective: str) -> tuple[list[dict], dict]:
    import copy

    from disa.config import TargetConfig, TrainConfig
    from disa.stages.fit_z import LogZTable
    from disa.training import RLTrainer

    tok = build_tokenizer()
    model = build_model(tok, shape)
    prompts = [{"id": str(i), "text": t} for i, t in enumerate(prompt_texts())]
    ref, log_z = None, None
    if objective == "disa":
        ref = copy.deepcopy(model).eval()
        log_z = LogZTable({p["id"]: 0.0 for p in prompts})
    config = TrainConfig(objective=objective, group_size=GROUP, prompts_per_step=PROMPTS, num_steps=steps,
                         max_new_tokens=shape["tokens"], lr=LR, micro_batch_size=PROMPTS * GROUP,
                         mixed_precision="bf16" if PRECISION == "bf16" else "no",
                         generation_batch_size=PROMPTS, updates_per_batch=1, save_every=0, seed=0,
                         gradient_checkpointing=grad_ckpt("disa"))
    trainer = RLTrainer(model, ref, tok, prompts, reward_fn, config, output_dir=out_dir,
                        target=TargetConfig(beta=1.0, reward_transform="raw"), log_z=log_z)
    timer, steps_out, lengths = PhaseTimer(), [], []
    timer.wrap(trainer.collector, "_generate", "rollout")
    timer.wrap(trainer, "collect_rollouts", "rollout+scoring")
    timer.wrap(trainer, "update", "update")
    tally = count_packed_tokens()
    rss0 = rss_mb()
    for _ in range(steps):
        timer.totals.clear()
        wall, cpu = clocks()
        trainer.step()
        wall2, cpu2 = clocks()
        steps_out.append(timer.step_row(wall2 - wall, cpu2 - cpu))
    lengths = LENGTH_LOG[:]
    return steps_out, {"rss_before_train_mb": rss0, "lengths": lengths,
                       "real_over_computed": tally["real"] / max(1, tally["computed"])}


LENGTH_LOG: list[int] = []


def count_packed_tokens() -> dict:
    """Tally real and computed positions of every scoring / training forward of ``disa`` (``batch_logprobs``
    sees each micro-batch, packed or padded) and log each rollout batch's completion lengths."""
    import disa.scoring
    import disa.training.collector
    import disa.training.models

    tally = {"real": 0, "computed": 0}
    inner = disa.scoring.batch_logprobs

    def counted(model, batch, *a, **k):
        tally["real"] += batch.real_tokens
        tally["computed"] += batch.input_ids.numel()
        return inner(model, batch, *a, **k)

    disa.scoring.batch_logprobs = counted
    disa.training.models.batch_logprobs = counted
    collect = disa.training.collector.RolloutCollector.collect

    def logged(self, *a, **k):
        out = collect(self, *a, **k)
        LENGTH_LOG.extend(len(r) for r in out.response_ids)
        return out

    disa.training.collector.RolloutCollector.collect = logged
    return tally


def worker(contender: str, shape_name: str, steps: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shape = SHAPES[shape_name]
    with tempfile.TemporaryDirectory() as out_dir:
        if contender in ("trl", "trl-kl"):
            rows, info = run_trl(shape, steps, out_dir, beta=KL_BETA if contender == "trl-kl" else 0.0)
        else:
            rows, info = run_disa(shape, steps, out_dir, contender.split("-", 1)[1])
    if LENGTHS == "forced" and set(info["lengths"]) != {shape["tokens"]}:
        raise SystemExit(f"{contender}: response lengths {sorted(set(info['lengths']))}, expected all {shape['tokens']}")
    print("RESULT " + json.dumps({"steps": rows[1:], "peak_rss_mb": rss_mb(), **info}))


def run_round(contender: str, shape: str, steps: int) -> dict:
    return run_worker(__file__, ["--worker", contender, "--shape", shape, "--steps", str(steps),
                                 "--precision", PRECISION, "--grad-ckpt", GRAD_CKPT, "--lengths", LENGTHS], contender)


def summarise(shape: str, results: dict[str, list[dict]], loads: list[float]) -> str:
    """Per clock (the process's CPU time, then wall time): median per-phase seconds per step over every counted
    step of every round and the ratio to each TRL contender present (per round, median [min, max]; > 1: faster
    than that TRL run); then completion lengths over every rollout (mean, median, [min, max]), real / computed
    positions in the scoring and training forwards, peak RSS (max over rounds)."""
    baselines = [b for b in ("trl", "trl-kl") if b in results]
    out = [f"shape {shape}: {SHAPES[shape]}, lengths {LENGTHS}, {PRECISION}, gradient checkpointing {GRAD_CKPT}, "
           f"{PROMPTS} prompts x G={GROUP}, rounds {len(next(iter(results.values())))}, 1-min load average "
           f"{min(loads):.1f}-{max(loads):.1f}"]

    def med(runs, key):
        return statistics.median(s[key] for r in runs for s in r["steps"])

    def per_round(runs, key):
        return [statistics.median(s[key] for s in r["steps"]) for r in runs]

    for clock, prefix in (("CPU s", "cpu_"), ("wall s", "")):
        out.append(f"{clock:<10} {'rollout':>8} {'scoring':>8} {'update':>8} {'step':>8}"
                   + "".join(f" {b.upper() + '/this':>21}" for b in baselines))
        for name, runs in results.items():
            mine = per_round(runs, prefix + "step")
            ratios = ""
            for b in baselines:
                rs = [t / m for t, m in zip(per_round(results[b], prefix + "step"), mine)]
                ratios += f" {statistics.median(rs):6.2f} [{min(rs):.2f}, {max(rs):.2f}]".rjust(22)
            out.append(f"{name:<10} " + " ".join(f"{med(runs, prefix + k):8.3f}" for k in
                                                 ("rollout", "scoring", "update", "step")) + ratios)
    out.append(f"{'':<10} {'length mean/median [min,max]':>30} {'real/computed':>13} {'peak MB':>8}")
    for name, runs in results.items():
        lengths = [n for r in runs for n in r["lengths"]]
        length = f"{statistics.mean(lengths):.1f}/{statistics.median(lengths):.0f} [{min(lengths)},{max(lengths)}]"
        real = statistics.median(r["real_over_computed"] for r in runs)
        out.append(f"{name:<10} {length:>30} {real:13.2f} {max(r['peak_rss_mb'] for r in runs):8.0f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the first is a warm-up")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 for both, or bf16 autocast for both (TRL's default is bf16)")
    ap.add_argument("--grad-ckpt", choices=["defaults", "on", "off"], default="defaults",
                    help="gradient checkpointing: each side's default (TRL on, disa off), or on / off in both")
    ap.add_argument("--lengths", choices=["forced", "variable"], default="forced",
                    help="forced: every completion --tokens long (EOS unreachable); variable: EOS reachable, mean "
                         "length about a third of the cap")
    ap.add_argument("--json", help="also write every raw number here")
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is a warm-up)")
    global PRECISION, GRAD_CKPT, LENGTHS
    PRECISION, GRAD_CKPT, LENGTHS = args.precision, args.grad_ckpt, args.lengths
    if args.worker:
        return worker(args.worker, args.shape, args.steps)
    contenders = args.contenders.split(",")
    raw = {}
    for shape in (list(SHAPES) if args.shape == "both" else [args.shape]):
        results: dict[str, list[dict]] = {c: [] for c in contenders}
        loads = [os.getloadavg()[0]]
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
            for c in order:
                results[c].append(run_round(c, shape, args.steps))
                loads.append(os.getloadavg()[0])
                print(f"  round {r + 1} {c}: {statistics.median(s['step'] for s in results[c][-1]['steps']):.3f} s/step"
                      f" (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
        print(summarise(shape, results, loads), flush=True)
        raw[shape] = {"results": results, "load_average_1min": loads}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()

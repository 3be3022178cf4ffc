"""The GPU acceptance run's parts, measurements and results table (driven by ``bench/gpu/acceptance.sh``).

Each part is a command run as a child process (what a user would type), with its wall time, the peak GPU
memory it used and the tokens it produced, read back from the files it wrote:

- ``pipeline/<stage>``: ``disa sample / label / fit-z / train / eval`` on ``examples/countdown.yaml`` (the
  committed testbed models, so nothing is downloaded) on CUDA in bfloat16 (``models.dtype=bfloat16``, and
  ``train.mixed_precision=bf16``), 20 training steps. Tokens: response tokens sampled
  (Stage 1 shards' ``response_len``), trained on (``metrics.csv``'s ``response_length_mean`` x rollouts per
  step) and evaluated (``eval_samples.parquet``).
- ``stage1/hf`` and ``stage1/vllm``: ``disa sample`` with the proposal = the reference, so ``logp_q`` (the
  engine's own log-prob of each sampled token) and ``logp_ref`` (transformers re-scoring the same tokens) are
  of one model, and ``|logp_q - logp_ref| / response_len`` is the per-token disagreement of the engine with
  re-scoring (bf16 kernels, batching; a wrong log-prob mode shows as a large value). ``hf`` is the control.
- ``trl/stage3`` and ``trl/stage3-vllm``: ``examples/trl_disa.py`` (and ``--vllm``, colocated); tokens from
  TRL's logged ``num_tokens``.

A part whose dependency is missing is skipped with the reason; a part that fails keeps its exit code and
the tail of its log. Peak memory is ``nvidia-smi``'s device-wide ``memory.used`` sampled every 0.2 s minus
the value before the part started (it sees vLLM's worker processes too, which ``torch.cuda`` statistics of
the parent would not).

    python bench/gpu/acceptance.py --out bench/results/gpu_acceptance.md [--dry-run] [--device cpu]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
STAGES = ("sample", "label", "fit-z", "train", "eval")
# countdown's models have a 40-token context: prompt (<= 15) + 16 new tokens
PIPELINE_SETTINGS = ["train.num_steps=20", "eval.k=4", "eval.pass_at=[1,4]"]


@dataclass
class Part:
    """One row of the table: a command, what it needs, and where its token count comes from."""

    name: str
    cmd: list[str]
    needs: list[str] = field(default_factory=list)  # python modules that must be importable
    timeout_s: float = 120.0
    tokens: Optional[Callable[["Result"], Optional[int]]] = None
    check: Optional[Callable[["Result"], str]] = None  # what the part shows, one short phrase
    skip: Optional[str] = None  # a reason decided up front (e.g. the example lacks --vllm)


@dataclass
class Result:
    name: str
    status: str  # ok | failed (rc N) | timed out | skipped: reason | dry run
    wall_s: Optional[float] = None
    tokens: Optional[int] = None
    peak_gib: Optional[float] = None
    check: str = ""
    log: str = ""

    @property
    def tokens_per_s(self) -> Optional[float]:
        if self.tokens is None or not self.wall_s:
            return None
        return self.tokens / self.wall_s


# ---------------------------------------------------------------- measuring

def parse_nvidia_smi_mib(text: str) -> Optional[float]:
    """Sum of ``memory.used`` (MiB) over the GPUs in ``nvidia-smi --query-gpu=memory.used
    --format=csv,noheader,nounits`` output; None when nothing parses."""
    values = [float(x) for x in re.findall(r"^\s*(\d+(?:\.\d+)?)\s*$", text, re.MULTILINE)]
    return sum(values) if values else None


def gpu_memory_mib(smi: Optional[str] = None) -> Optional[float]:
    smi = smi or shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_nvidia_smi_mib(out.stdout) if out.returncode == 0 else None


class PeakMemory:
    """Samples device memory in a thread while a part runs; ``peak_gib`` is the rise over the start value."""

    def __init__(self, period_s: float = 0.2, read: Callable[[], Optional[float]] = gpu_memory_mib):
        self.period_s, self.read = period_s, read
        self.start = read()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.period_s):
            v = self.read()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v

    def __enter__(self):
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def peak_gib(self) -> Optional[float]:
        if self.start is None or self.peak is None:
            return None
        return (self.peak - self.start) / 1024


def missing_modules(names: Sequence[str]) -> list[str]:
    """The modules of ``names`` that are not installed (found without importing them)."""
    out = []
    for n in names:
        try:
            if importlib.util.find_spec(n) is None:
                out.append(n)
        except (ImportError, ValueError):
            out.append(n)
    return out


def run_part(part: Part, log_dir: Path, dry_run: bool = False, env: Optional[dict] = None) -> Result:
    if part.skip:
        return Result(part.name, f"skipped: {part.skip}")
    missing = missing_modules(part.needs)
    if missing:
        return Result(part.name, f"skipped: {', '.join(missing)} not installed")
    if dry_run:
        return Result(part.name, "dry run", check=" ".join(part.cmd))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / (part.name.replace("/", "_") + ".log")
    t0 = time.perf_counter()
    with PeakMemory() as mem, open(log_path, "w") as log:
        try:
            rc = subprocess.run(part.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=part.timeout_s,
                                env=env).returncode
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out ({part.timeout_s:.0f} s)"
    res = Result(part.name, status, wall_s=time.perf_counter() - t0, peak_gib=mem.peak_gib,
                 log=str(log_path.relative_to(REPO)) if log_path.is_relative_to(REPO) else str(log_path))
    if status == "ok":
        for attr, fn in (("tokens", part.tokens), ("check", part.check)):
            if fn is not None:
                try:
                    setattr(res, attr, fn(res))
                except Exception as e:  # a reader's failure is a finding, not a crash of the whole run
                    res.check = f"{res.check} (could not read {attr}: {type(e).__name__}: {e})".strip()
    else:
        res.check = tail(log_path)
    return res


def tail(path: Path, n: int = 1) -> str:
    lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-200:]


# ---------------------------------------------------------------- reading the parts' files

def sampled_tokens(samples_dir: Path) -> int:
    import pyarrow.parquet as pq

    shards = sorted(glob.glob(str(Path(samples_dir) / "shard-*.parquet")))
    if not shards:
        raise FileNotFoundError(f"no shard-*.parquet in {samples_dir}")
    return int(sum(sum(pq.read_table(s, columns=["response_len"]).column(0).to_pylist()) for s in shards))


def logp_disagreement(samples_dir: Path) -> dict:
    """Per-token ``|logp_q - logp_ref| / response_len`` over every row: mean and max (nats/token)."""
    import pyarrow.parquet as pq

    per_token = []
    for s in sorted(glob.glob(str(Path(samples_dir) / "shard-*.parquet"))):
        t = pq.read_table(s, columns=["logp_q", "logp_ref", "response_len"]).to_pydict()
        per_token += [abs(q - r) / max(n, 1) for q, r, n in zip(t["logp_q"], t["logp_ref"], t["response_len"])]
    if not per_token:
        raise ValueError(f"no rows in {samples_dir}")
    if not all(math.isfinite(x) for x in per_token):
        raise ValueError(f"non-finite logp_q - logp_ref in {samples_dir}")
    return {"rows": len(per_token), "mean": sum(per_token) / len(per_token), "max": max(per_token)}


def sample_check(samples_dir: Path) -> str:
    import pyarrow.parquet as pq

    rows = bad = 0
    for s in sorted(glob.glob(str(Path(samples_dir) / "shard-*.parquet"))):
        t = pq.read_table(s, columns=["logp_q", "logp_ref"]).to_pydict()
        rows += len(t["logp_q"])
        bad += sum(not (math.isfinite(q) and math.isfinite(r)) for q, r in zip(t["logp_q"], t["logp_ref"]))
    return f"{rows} rollouts, log-probs finite: {'yes' if not bad else f'no ({bad} rows)'}"


def trained_tokens(metrics_csv: Path, rollouts_per_step: int) -> int:
    import csv

    with open(metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{metrics_csv} has no steps")
    return int(round(sum(float(r["response_length_mean"]) * rollouts_per_step for r in rows)))


def train_check(metrics_csv: Path) -> str:
    import csv

    with open(metrics_csv) as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["loss"]) for r in rows]
    bad = [i + 1 for i, x in enumerate(losses) if not math.isfinite(x)]
    skipped = rows[-1].get("skipped_steps", "0")
    first, last = rows[0].get("tb_residual_abs"), rows[-1].get("tb_residual_abs")
    return (f"{len(rows)} steps, loss finite: {'yes' if not bad else f'no (steps {bad})'}, skipped steps "
            f"{skipped}, |residual| {float(first):.3g} -> {float(last):.3g}" if first else f"{len(rows)} steps")


def trl_num_tokens(log_path: Path) -> Optional[int]:
    """The last ``num_tokens`` TRL logged (its Trainer prints each log dict to the console)."""
    hits = re.findall(r"['\"]num_tokens['\"]:\s*([0-9.eE+]+)", Path(log_path).read_text(errors="replace"))
    return int(float(hits[-1])) if hits else None


def eval_check(run_dir: Path) -> str:
    s = json.loads((Path(run_dir) / "eval.json").read_text())["summary"]
    passes = ", ".join(f"pass@{k} {v:.3f}" for k, v in s["pass_at"].items())
    return f"Mean@{s['k']} {s['mean_at_k']:.3f}, {passes} over {s['prompts']} prompts"


# ---------------------------------------------------------------- the plan

def plan(work: Path, device: str, python: str = sys.executable, trl_has_vllm_flag: Optional[bool] = None) -> list[Part]:
    """Every part, in order. ``device`` cpu runs the same commands in float32 (a check of this script)."""
    dtype = "bfloat16" if device == "cuda" else "float32"
    disa = [python, "-m", "disa.cli"]
    common = ["-c", "examples/countdown.yaml", "--set", f"models.device={device}", "--set", f"models.dtype={dtype}"]
    run = work / "pipeline"
    bf16_train = ["train.mixed_precision=bf16"] if device == "cuda" else []  # autocast on top of bf16 weights
    sets = [a for s in [f"output_dir={run}", *PIPELINE_SETTINGS, *bf16_train] for a in ("--set", s)]
    rollouts = 8 * 8  # countdown.yaml: train.group_size x train.prompts_per_step
    parts = []
    for stage in STAGES:
        tokens = {"sample": lambda r: sampled_tokens(run / "samples"),
                  "train": lambda r: trained_tokens(run / "checkpoints" / "metrics.csv", rollouts),
                  "eval": lambda r: sampled_tokens_eval(run)}.get(stage)
        check = {"sample": lambda r: sample_check(run / "samples"),
                 "train": lambda r: train_check(run / "checkpoints" / "metrics.csv"),
                 "eval": lambda r: eval_check(run)}.get(stage)
        parts.append(Part(f"pipeline/{stage}", [*disa, stage, *common, *sets], timeout_s=150, tokens=tokens,
                          check=check))
    for engine, needs in (("hf", []), ("vllm", ["vllm"])):
        out = work / f"stage1-{engine}"
        options = "{gpu_memory_utilization: 0.5, max_model_len: 40}" if engine == "vllm" else "{}"
        cmd = [*disa, "sample", *common, "--set", f"output_dir={out}", "--set", "models.proposal=null",
               "--set", f"sample.generation={{engine: {engine}, options: {options}}}"]
        parts.append(Part(f"stage1/{engine}", cmd, needs=needs, timeout_s=180,
                          tokens=lambda r, out=out: sampled_tokens(out / "samples"),
                          check=lambda r, out=out: "per-token |logp_q - logp_ref|: mean {mean:.2e}, max {max:.2e} "
                          "nats over {rows} rollouts".format(**logp_disagreement(out / "samples"))))
    example = (REPO / "examples" / "trl_disa.py").read_text()
    trl_cmd = [python, "examples/trl_disa.py"]
    out_dir = lambda name: ["--output-dir", str(work / name)] if "--output-dir" in example else []  # noqa: E731
    trl_tokens = lambda r: trl_num_tokens(REPO / r.log)  # noqa: E731
    parts.append(Part("trl/stage3", [*trl_cmd, *out_dir("trl")], needs=["trl"], timeout_s=180, tokens=trl_tokens))
    if trl_has_vllm_flag is None:
        trl_has_vllm_flag = "--vllm" in example
    parts.append(Part("trl/stage3-vllm", [*trl_cmd, *out_dir("trl-vllm"), "--vllm"], needs=["trl", "vllm"],
                      timeout_s=240,
                      tokens=trl_tokens,
                      skip=None if device == "cuda" and trl_has_vllm_flag else (
                          "examples/trl_disa.py has no --vllm flag" if not trl_has_vllm_flag else "needs CUDA")))
    return parts


def sampled_tokens_eval(run_dir: Path) -> int:
    import pyarrow.parquet as pq

    return int(sum(pq.read_table(Path(run_dir) / "eval_samples.parquet", columns=["response_len"]).column(0)
                   .to_pylist()))


# ---------------------------------------------------------------- the table

def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(results: Sequence[Result], header: dict) -> str:
    lines = ["# GPU acceptance run (`bench/gpu/acceptance.sh`)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "wall s is the whole command (interpreter, imports, model loading included); tokens/s = tokens / "
              "wall s; peak GPU GiB = nvidia-smi's memory.used peak minus its value before the part.",
              "", "| part | status | wall s | tokens | tokens/s | peak GPU GiB | what it shows |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        check = r.check.replace("|", "\\|")
        lines.append(f"| {r.name} | {r.status} | {fmt(r.wall_s, '.1f')} | {fmt(r.tokens, 'd')} | "
                     f"{fmt(r.tokens_per_s, '.0f')} | {fmt(r.peak_gib, '.2f')} | {check} |")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    env = {"date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "device": device}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                           text=True)
        env["GPU"] = q.stdout.strip().replace("\n", "; ") or "?"
    for mod in ("torch", "transformers", "trl", "vllm"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod)
        except Exception:
            env[mod] = "not installed"
    return env


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_acceptance.md"))
    ap.add_argument("--work", default="/tmp/disa-gpu-acceptance", help="run folders and logs (wiped first)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when nvidia-smi finds a GPU; cpu runs the same commands in float32")
    ap.add_argument("--only", default="", help="comma-separated part-name prefixes to run (e.g. pipeline,stage1)")
    ap.add_argument("--dry-run", action="store_true", help="print and tabulate the plan; run nothing")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="total seconds for all parts: each part's timeout is cut to what is left, and parts that "
                         "find less than 20 s left are skipped (so the table is always written)")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if gpu_memory_mib() is not None else "cpu")
    work = Path(a.work)
    if not a.dry_run:
        shutil.rmtree(work, ignore_errors=True)
    parts = plan(work, device)
    if a.only:
        parts = [p for p in parts if p.name.startswith(tuple(x for x in a.only.split(",") if x))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    results, t0 = [], time.perf_counter()
    for p in parts:
        left = a.budget_s - (time.perf_counter() - t0)
        if left < 20 and not a.dry_run:
            p.skip = p.skip or f"time budget ({a.budget_s:.0f} s) spent"
        p.timeout_s = min(p.timeout_s, max(left, 1.0))
        r = run_part(p, work / "logs", dry_run=a.dry_run, env=env)
        print(json.dumps(asdict(r)), flush=True)
        results.append(r)
    header = environment(device)
    if a.dry_run:
        header["note"] = "dry run: nothing was executed"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(render(results, header))
    print(f"wrote {a.out}")
    return 0 if all(passed(r) for r in results) else 1


def passed(r: Result) -> bool:
    """ok, dry run, or skipped for a missing dependency; a failure, a timeout or a spent budget is not."""
    return r.status in ("ok", "dry run") or (r.status.startswith("skipped") and "time budget" not in r.status)


if __name__ == "__main__":
    sys.exit(main())

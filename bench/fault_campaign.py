"""A reduced fault campaign on the countdown example (issue 26): each case damages a copy of one finished run or its
inputs, runs real `disa` processes on it, and classifies what happened.

    PYTHONPATH=src python bench/fault_campaign.py [--only NAME] [--json bench/results/fault_campaign.json]

Outcomes: ``named`` (exit 2 with one line naming the expected file, row, field or setting), ``recovered`` (exit 0 and
the result checked equal to an undamaged run's, or the damage undone), ``130`` (Ctrl-C: exit 130, one line). Failures
of the campaign: ``silent`` (exit 0 with a wrong or unchecked result), ``unnamed`` (an error that is a traceback, a
library exception, several lines or does not name what it should), ``rows`` (metrics.csv with lost or duplicated
steps). The table it prints is the one in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "countdown.yaml")
FAST = ["sample.n=4", "eval.k=2", "eval.pass_at=[1]"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def command(verb: str, out: Path, *sets: str) -> list[str]:
    argv = [sys.executable, "-m", "disa.cli", verb, "-c", CONFIG]
    for s in (f"output_dir={out}", *FAST, *sets):
        argv += ["--set", s]
    return argv


def disa(verb: str, out: Path, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(verb, out, *sets), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)


def steps_of(out: Path) -> list[int]:
    lines = (out / "checkpoints" / "metrics.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines if line]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("disa train: WARNING")]
    return lines[-1] if lines else ""


def one_line(done: subprocess.CompletedProcess) -> bool:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in done.stderr


def refused(done, *needles: str) -> tuple[str, str]:
    if done.returncode == 0:
        return "silent", "exit 0"
    named = done.returncode == 2 and one_line(done) and all(n in done.stderr for n in needles)
    return ("named" if named else "unnamed"), error_line(done)


def recovered(done, ok: bool, why: str = "") -> tuple[str, str]:
    if done.returncode != 0:
        return "unnamed", error_line(done)
    return ("recovered" if ok else "silent"), why


# ----------------------------------------------------------------------------------------------- the cases
def write_parquet_column(path: Path, column: str, row: int, value) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values))
                   .replace_schema_metadata(table.schema.metadata), path)


def shard(out: Path) -> Path:
    return next((out / "samples").glob("shard-*.parquet"))


def prompts_with(tmp: Path, line_no: int, raw: bytes) -> Path:
    lines = (ROOT / "examples/countdown/prompts.jsonl").read_bytes().splitlines(keepends=True)
    lines[line_no - 1] = raw
    path = tmp / "prompts.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def case_two_trainings(out, tmp):
    shutil.rmtree(out / "checkpoints")
    procs = [subprocess.Popen(command("train", out, "train.num_steps=8"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    if codes != [0, 2] or not any("in use by another `disa train`" in e for c, e in results if c == 2):
        return "silent" if codes == [0, 0] else "unnamed", f"exit codes {codes}"
    return ("named", "one trains, the other: in use by another `disa train` (pid ...)") if steps_of(out) == \
        list(range(1, 9)) else ("rows", f"steps {steps_of(out)}")


def kill_when_written(argv, path, timeout_s: float = 300.0) -> bool:
    """Start ``argv``, SIGKILL it as soon as ``path`` appears (or after ``timeout_s``); whether it was still alive."""
    victim = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    deadline = time.time() + timeout_s
    while not path.exists() and time.time() < deadline:
        time.sleep(0.01)
    alive = victim.poll() is None
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    return alive


def case_kill_training(out, tmp):
    straight = tmp / "straight"
    shutil.copytree(out, straight)
    for o in (out, straight):
        shutil.rmtree(o / "checkpoints")
    sets = ("train.num_steps=12", "train.save_every=2")
    disa("train", straight, *sets)
    alive = kill_when_written(command("train", out, *sets), out / "checkpoints" / "checkpoint-6")
    at = max(int(p.name.split("-")[-1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    done = disa("train", out, *sets)
    final = "checkpoints/checkpoint-12/policy"
    if done.returncode == 0 and steps_of(out) != list(range(1, 13)):
        return "rows", f"steps {steps_of(out)}"
    return recovered(done, alive and same_weights(out / final, straight / final), f"SIGKILL with checkpoint-{at} "
                     "written, re-run: the final weights equal an uninterrupted run's, steps 1-12 once")


def case_kill_sampling(out, tmp):
    fresh, straight = tmp / "fresh", tmp / "straight-sample"
    sets = ("sample.shard_size=4",)
    disa("sample", straight, *sets)
    alive = kill_when_written(command("sample", fresh, *sets), fresh / "samples" / "shard-00002.parquet")
    written = len(list((fresh / "samples").glob("shard-*.parquet")))
    done = disa("sample", fresh, *sets)
    names = sorted(p.name for p in (straight / "samples").iterdir())
    same = names == sorted(p.name for p in (fresh / "samples").iterdir()) and all(
        (straight / "samples" / n).read_bytes() == (fresh / "samples" / n).read_bytes() for n in names)
    return recovered(done, alive and same, f"SIGKILL with {written} of 6 shards written, re-run: every shard "
                     "bit-identical to an uninterrupted run's")


def case_ctrl_c(out, tmp):
    shutil.rmtree(out / "checkpoints")
    p = subprocess.Popen(command("train", out, "train.num_steps=500"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    time.sleep(0.8)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    ok = p.returncode == 130 and "Traceback" not in err and err.strip().splitlines()[-1].endswith("interrupted (a re-run resumes)")
    return ("130" if ok else "unnamed"), err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"


def resume(change: str, needle: str):
    return lambda out, tmp: refused(disa("train", out, "train.num_steps=6", change), needle)


def sample_again(change: str, needle: str):
    return lambda out, tmp: refused(disa("sample", out, change), needle)


def damaged(target: str, verb: str, data: bytes, needle: str):
    def run(out, tmp):
        if verb == "train":
            shutil.rmtree(out / "checkpoints")
        (out / target).write_bytes(data)
        return refused(disa(verb, out), str(out / target), needle)
    return run


def case_table_remade(out, tmp):
    import pyarrow.parquet as pq

    path = out / "log_z" / "table.parquet"
    table = pq.read_table(path)
    for i in range(table.num_rows):
        write_parquet_column(path, "log_z", i, table.column("log_z")[i].as_py() + 5.0)
    return refused(disa("train", out, "train.num_steps=6"), "log_z/table.parquet: recorded")


def case_state_edited(out, tmp):
    state = out / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    data = json.loads(state.read_text())
    data["step"] = 3
    state.write_text(json.dumps(data))
    return refused(disa("train", out, "train.num_steps=6"), str(state))


def case_cache_truncated(out, tmp):
    cache = out / "log_z" / "embeddings.safetensors"
    cache.write_bytes(cache.read_bytes()[:50])
    before = (out / "log_z" / "table.parquet").read_bytes()
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = disa("fit-z", out)
    same = done.returncode == 0 and pq.read_table(out / "log_z" / "table.parquet").equals(
        pq.read_table(pa.BufferReader(before)))
    return recovered(done, same, "a cache miss: re-embedded, the fit unchanged")


def case_shard_row_dropped(out, tmp):
    import pyarrow.parquet as pq

    path = shard(out)
    table = pq.read_table(path)
    pq.write_table(table.slice(0, table.num_rows - 1), path)
    return refused(disa("label", out), str(path), "rows, but meta.json says")


def case_shard_foreign_id(out, tmp):
    path = shard(out)
    write_parquet_column(path, "prompt_id", 0, "intruder")
    return refused(disa("label", out), str(shard(out)), "samples, not n = 4")


def case_metrics_truncated(out, tmp):
    metrics = out / "checkpoints" / "metrics.csv"
    metrics.write_text(metrics.read_text()[:40])
    done = disa("train", out, "train.num_steps=6")
    if done.returncode == 0 and steps_of(out) != list(range(1, 7)):
        return "rows", f"steps {steps_of(out)}"
    return recovered(done, True, "rebuilt from the checkpoint's history: steps 1-6 once")


def case_shard_value(column: str, value, needle: str):
    def run(out, tmp):
        path = shard(out)
        write_parquet_column(path, column, 4, value)
        return refused(disa("label", out), f"{path}, row 5: column {column!r}", needle)
    return run


def case_table_nan(out, tmp):
    import pyarrow.parquet as pq

    shutil.rmtree(out / "checkpoints")
    path = out / "log_z" / "table.parquet"
    pid = pq.read_table(path).column("prompt_id")[2].as_py()
    write_parquet_column(path, "log_z", 2, float("nan"))
    return refused(disa("train", out), f"{pid!r} (nan)")


def case_beta_overflow(out, tmp):
    before = (out / "labels.parquet").read_bytes()
    done = disa("label", out, "target.beta=720")
    outcome = refused(done, "get a non-finite label")
    return outcome if (out / "labels.parquet").read_bytes() == before else ("silent", "labels.parquet rewritten")


def setting(verb: str, change: str, needle: str, fresh: bool = False, also: str = ""):
    def run(out, tmp):
        if fresh:
            shutil.rmtree(out / "checkpoints")
        return refused(disa(verb, out, change, *([also] if also else [])), needle)
    return run


def bad_prompts(line_no: int, raw: bytes, needle: str):
    def run(out, tmp):
        path = prompts_with(tmp, line_no, raw)
        return refused(disa("sample", tmp / "fresh", f"data.prompts={path}"), f"{path}, line {line_no}", needle)
    return run


def case_huge_line(out, tmp):
    path = prompts_with(tmp, 3, (json.dumps({"id": "huge", "prompt": "7 " * 5_000_000, "numbers": [7], "target": 7})
                                 + "\n").encode())
    probe = ("import resource, subprocess, sys\n"  # the peak RSS of this one `disa sample` process
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "sys.stderr.write(r.stderr)\n"
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.time()
    run = subprocess.run([sys.executable, "-c", probe, *command("sample", tmp / "fresh", f"data.prompts={path}")],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=900)
    code, peak_kb = (int(v) for v in run.stdout.split())
    done = subprocess.CompletedProcess(run.args, code, "", run.stderr)
    outcome, line = refused(done, f"{path}, line 3 (id 'huge'): at least")
    return outcome, line + f" [{time.time() - start:.1f} s, peak RSS {peak_kb / 1e6:.2f} GB]"


def case_wrong_weights(out, tmp):
    folder = tmp / "deeper"
    shutil.copytree(ROOT / "examples/countdown/ref", folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_layer"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    shutil.rmtree(out / "checkpoints")
    return refused(disa("train", out, f"models.policy={folder}"), "models.policy:", "weights missing")


def case_stale_temporaries(out, tmp):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [out / f"labels.parquet.tmp-{dead.pid}", out / "samples" / f"shard-00000.parquet.tmp-{dead.pid}"]
    for p in stale:
        p.write_bytes(b"half")
    done = disa("label", out)
    return recovered(done, not any(p.exists() for p in stale), "swept when `disa label` took the lock")


CASES = [
    ("two writers", "two `disa train` on one output_dir", case_two_trainings),
    ("kills", "SIGKILL `disa train` at a checkpoint, re-run", case_kill_training),
    ("kills", "SIGKILL `disa sample` between shards, re-run", case_kill_sampling),
    ("kills", "Ctrl-C `disa train` at 0.8 s", case_ctrl_c),
    ("resume guards", "`disa sample` again with models.proposal = the reference",
     sample_again("models.proposal=examples/countdown/ref", "models.proposal: recorded")),
    ("resume guards", "`disa sample` again with models.dtype bfloat16",
     sample_again("models.dtype=bfloat16", "models.dtype: recorded 'float32', now 'bfloat16'")),
    ("resume guards", "`disa train` resumed with another models.reference",
     resume("models.reference=examples/countdown/proposal", "models.reference: recorded")),
    ("resume guards", "`disa train` resumed with another eval.select_holdout",
     resume("eval.select_holdout=4", "eval.select_holdout: recorded 0, now 4")),
    ("resume guards", "`disa train` resumed after log_z/table.parquet was made again (+5 nats)", case_table_remade),
    ("resume guards", "`disa train` with train.num_steps below the checkpoint's step",
     setting("train", "train.num_steps=2", "train.num_steps: 2, but")),
    ("damaged files", "labels.parquet not Parquet", damaged("labels.parquet", "fit-z", b"PAR1 garbage", "re-run `disa label`")),
    ("damaged files", "meta.json truncated", damaged("meta.json", "label", b'{"n": 4', "re-run `disa sample`")),
    ("damaged files", "log_z/table.parquet zeroed", damaged("log_z/table.parquet", "train", b"\0" * 64, "re-run `disa fit-z`")),
    ("damaged files", "trainer_state.json with another step", case_state_edited),
    ("damaged files", "embedding cache truncated", case_cache_truncated),
    ("damaged files", "a shard missing a row", case_shard_row_dropped),
    ("damaged files", "a shard with a foreign prompt id", case_shard_foreign_id),
    ("damaged files", "metrics.csv truncated mid-row, then a resume", case_metrics_truncated),
    ("numbers", "a shard with reward 7 (countdown: [0, 1])",
     case_shard_value("reward", 7.0, "outside the reward range [0, 1] verifier 'countdown' declares")),
    ("numbers", "a shard with logp_ref 1e6", case_shard_value("logp_ref", 1e6, "a log-probability is <= 0")),
    ("numbers", "NaN in the frozen log Z table", case_table_nan),
    ("numbers", "target.beta 720 (labels overflow)", case_beta_overflow),
    ("numbers", "train.weight_decay=.inf", setting("train", "train.weight_decay=.inf", "train.weight_decay: must be a finite number")),
    ("numbers", "grpo with train.group_size 1",
     setting("train", "train.group_size=1", "train.group_size: 1, but grpo", fresh=True, also="train.objective=grpo")),
    ("inputs", "a prompt file with a Latin-1 byte", bad_prompts(3, b'{"id": "x", "prompt": "caf\xe9 -> 1 ="}\n', "not UTF-8")),
    ("inputs", "an empty prompt", bad_prompts(2, b'{"id": "x", "prompt": " ", "numbers": [1], "target": 1}\n',
                                              "field 'prompt' is empty")),
    ("inputs", "a countdown row with numbers but no target",
     bad_prompts(4, b'{"id": "x", "prompt": "1 2 -> 3 =", "numbers": [1, 2]}\n', "field 'target' is missing")),
    ("inputs", "a 10 MB prompt line", case_huge_line),
    ("inputs", "2-layer weights under n_layer: 4 (models.policy)", case_wrong_weights),
    ("inputs", "stale *.tmp-<pid> files of a dead writer", case_stale_temporaries),
]
FAILURES = ("silent", "unnamed", "rows")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run the cases whose name contains this text")
    parser.add_argument("--json", default=None, help="also write the outcomes here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="disa-faults-") as tmpdir:
        base = Path(tmpdir) / "base"
        done = disa("run", base, "train.num_steps=4")
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        results = []
        for k, (group, name, case) in enumerate(CASES):
            if args.only and args.only not in name:
                continue
            tmp = Path(tmpdir) / f"case-{k}"
            tmp.mkdir()
            out = tmp / "run"
            shutil.copytree(base, out)
            start = time.time()
            try:
                outcome, said = case(out, tmp)
            except Exception as e:  # the harness's own failure: counted, never hidden
                outcome, said = "unnamed", f"harness: {type(e).__name__}: {e}"
            results.append({"group": group, "case": name, "outcome": outcome, "said": said,
                            "seconds": round(time.time() - start, 1)})
            print(f"{outcome:9s} {name}: {said[:160]}", file=sys.stderr, flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
    print("| group | case | outcome | what it said |\n|---|---|---|---|")
    for r in results:
        said = r["said"].replace(tmpdir, "…").replace(str(ROOT), ".").replace("|", "\\|")
        said = said if len(said) <= 170 else said[:120] + " … " + said[-47:]  # the head and the measured tail
        print(f"| {r['group']} | {r['case']} | {r['outcome']} | {said} |")
    counts = {o: sum(r["outcome"] == o for r in results) for o in ("named", "recovered", "130", *FAILURES)}
    print("\n" + ", ".join(f"{n} {o}" for o, n in counts.items()) + f" ({len(results)} cases)")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "counts": counts}, indent=1) + "\n")
    return 1 if any(counts[o] for o in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/gpu/acceptance.sh's CPU-testable logic: the scripts parse, the plan and its skips, the measuring and
the readers of each part's files, on hand-made inputs (the GPU run itself needs a GPU)."""

import csv
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("acceptance", REPO / "bench" / "gpu" / "acceptance.py")
acc = sys.modules["acceptance"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(acc)


@pytest.mark.parametrize("script", ["bench/gpu/acceptance.sh", ".ci/verl_check.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0


def test_dry_run_tabulates_every_part_and_skips_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(acc, "missing_modules", lambda names: [n for n in names if n == "vllm"])
    out = tmp_path / "table.md"
    assert acc.main(["--dry-run", "--device", "cuda", "--out", str(out), "--work", str(tmp_path / "w")]) == 0
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| part")}
    assert list(rows) == [f"pipeline/{s}" for s in acc.STAGES] + ["stage1/hf", "stage1/vllm", "trl/stage3",
                                                                   "trl/stage3-vllm"]
    assert rows["stage1/vllm"] == "skipped: vllm not installed"
    assert rows["pipeline/train"] == rows["stage1/hf"] == "dry run"
    assert "models.dtype=bfloat16" in out.read_text() and "models.device=cuda" in out.read_text()
    assert not (tmp_path / "w").exists()  # a dry run touches nothing


def test_vllm_trl_part_needs_the_example_flag_and_cuda(tmp_path):
    by_name = lambda parts: {p.name: p for p in parts}  # noqa: E731
    assert "no --vllm flag" in by_name(acc.plan(tmp_path, "cuda", trl_has_vllm_flag=False))["trl/stage3-vllm"].skip
    assert by_name(acc.plan(tmp_path, "cpu", trl_has_vllm_flag=True))["trl/stage3-vllm"].skip == "needs CUDA"
    part = by_name(acc.plan(tmp_path, "cuda", trl_has_vllm_flag=True))["trl/stage3-vllm"]
    assert part.skip is None and part.cmd[-1] == "--vllm" and part.needs == ["trl", "vllm"]


def test_nvidia_smi_output_and_peak_memory():
    assert acc.parse_nvidia_smi_mib("1200\n300\n") == 1500.0  # two GPUs: summed
    assert acc.parse_nvidia_smi_mib("NVIDIA-SMI has failed") is None
    readings = iter([1000.0, 1800.0, 3048.0, 2000.0] + [2000.0] * 1000)
    with acc.PeakMemory(period_s=0.001, read=lambda: next(readings)) as mem:
        deadline = time.monotonic() + 10
        while mem.peak < 3048.0 and time.monotonic() < deadline:
            time.sleep(0.001)
    assert mem.peak_gib == pytest.approx(2048 / 1024)
    with acc.PeakMemory(read=lambda: None) as none:
        pass
    assert none.peak_gib is None


def test_run_part_statuses(tmp_path):
    py = sys.executable
    ok = acc.Part("a/ok", [py, "-c", "print({'loss': 1.0, 'num_tokens': 4096.0})"],
                  tokens=lambda r: acc.trl_num_tokens(Path(r.log)))
    res = acc.run_part(ok, tmp_path)
    assert res.status == "ok" and res.tokens == 4096 and res.tokens_per_s == pytest.approx(4096 / res.wall_s)
    bad = acc.run_part(acc.Part("a/bad", [py, "-c", "import sys; print('boom'); sys.exit(3)"]), tmp_path)
    assert bad.status == "failed (rc 3)" and bad.check == "boom"
    slow = acc.run_part(acc.Part("a/slow", [py, "-c", "import time; time.sleep(30)"], timeout_s=0.5), tmp_path)
    assert slow.status.startswith("timed out")
    gone = acc.run_part(acc.Part("a/gone", [py], needs=["no_such_module_xyz"]), tmp_path)
    assert gone.status == "skipped: no_such_module_xyz not installed" and acc.passed(gone)
    assert not acc.passed(bad) and not acc.passed(acc.Result("x", "skipped: time budget (1 s) spent"))


def test_a_spent_budget_skips_the_remaining_parts_and_still_writes_the_table(tmp_path):
    out = tmp_path / "t.md"
    assert acc.main(["--device", "cpu", "--budget-s", "0", "--out", str(out), "--work", str(tmp_path / "w"),
                     "--only", "pipeline"]) == 1
    assert out.read_text().count("skipped: time budget (0 s) spent") == len(acc.STAGES)


def test_readers_of_the_parts_files(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    pq.write_table(pa.table({"logp_q": [-3.0, -1.0], "logp_ref": [-2.5, -1.2], "response_len": [5, 2]}),
                   samples / "shard-00000.parquet")
    pq.write_table(pa.table({"logp_q": [-4.0], "logp_ref": [-4.0], "response_len": [4]}),
                   samples / "shard-00001.parquet")
    assert acc.sampled_tokens(samples) == 11
    assert acc.sample_check(samples) == "3 rollouts, log-probs finite: yes"
    d = acc.logp_disagreement(samples)  # per token: 0.5/5, 0.2/2, 0/4
    assert d["rows"] == 3 and d["mean"] == pytest.approx(0.2 / 3) and d["max"] == pytest.approx(0.1)
    metrics = tmp_path / "metrics.csv"
    with open(metrics, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["step", "loss", "response_length_mean", "skipped_steps", "tb_residual_abs"])
        w.writeheader()
        w.writerow({"step": 1, "loss": 0.5, "response_length_mean": 5.5, "skipped_steps": 0, "tb_residual_abs": 0.9})
        w.writerow({"step": 2, "loss": "nan", "response_length_mean": 4.0, "skipped_steps": 1, "tb_residual_abs": 0.4})
    assert acc.trained_tokens(metrics, rollouts_per_step=64) == round(9.5 * 64)
    assert acc.train_check(metrics) == "2 steps, loss finite: no (steps [2]), skipped steps 1, |residual| 0.9 -> 0.4"
    with pytest.raises(FileNotFoundError, match="shard"):
        acc.sampled_tokens(tmp_path / "nothing")


def test_table_rendering():
    rows = [acc.Result("p/one", "ok", wall_s=2.0, tokens=100, peak_gib=1.5, check="a | b"),
            acc.Result("p/two", "skipped: vllm not installed")]
    text = acc.render(rows, {"GPU": "H100"})
    assert "- GPU: H100" in text
    assert "| p/one | ok | 2.0 | 100 | 50 | 1.50 | a \\| b |" in text
    assert "| p/two | skipped: vllm not installed | - | - | - | - |  |" in text

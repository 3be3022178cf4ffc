"""`disa report`: one self-contained HTML page from whatever a run or study folder holds."""

import json
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from disa import cli
from disa.report import build_report, markdown_to_html, read_metrics_csv


def test_markdown_to_html_tables_headings_and_escaping():
    page = markdown_to_html("# Title\n\ntext <b>\n\n| a | b |\n|---|---|\n| 1 | x\\|y |\n\n![p](p.png)\n")
    assert "<h3>Title</h3>" in page and "<p>text &lt;b&gt;</p>" in page
    assert "<tr><th>a</th><th>b</th></tr><tr><td>1</td><td>x\\|y</td></tr>" in page
    assert "p.png" not in page  # linked images are embedded separately, never referenced


def fake_run(root):
    pq.write_table(pa.table({"prompt_id": ["a", "b", "c"], "log_z": [0.1, 0.5, 1.2], "ess": [3.0, 5.0, 8.0]}),
                   root / "labels.parquet")
    (root / "log_z").mkdir()
    (root / "log_z" / "report.json").write_text(json.dumps({
        "val_mse": 0.05, "baseline_val_mse": 0.2, "val_r2": 0.7, "train_mse": 0.03, "best_epoch": 2,
        "history": [{"epoch": e, "train_loss": 1 / e, "val_mse": 1.5 / e} for e in (1, 2, 3)]}))
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "metrics.csv").write_text("step,loss,reward_mean\n1,0.9,0.1\n2,0.7,0.3\n3,0.5,nan\n")
    ev = root / "eval" / "checkpoint-3"
    ev.mkdir(parents=True)
    (ev / "eval.md").write_text("# Evaluation\n\n| metric | value |\n|---|---|\n| Mean@4 | 0.5000 |\n")
    (ev / "eval.json").write_text(json.dumps({"summary": {"pass_curve": [0.5, 0.7, 0.8, 0.85]}}))
    return root


def test_report_has_every_section_and_no_external_reference(tmp_path):
    path = build_report(fake_run(tmp_path))
    page = path.read_text()
    for heading in ("Stage 1 labels", "Stage 2 regressor", "Training curves", "Evaluation"):
        assert f"<h2>{heading}</h2>" in page
    assert "<td>0.05</td>" in page and "<td>Mean@4</td><td>0.5000</td>" in page
    assert page.count("data:image/png;base64,") == 2 + 1 + 2 + 1  # histograms, loss, two curves, pass@k
    assert 'src="http' not in page and "href=" not in page


def test_report_cli_errors_and_metrics_csv(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err
    (tmp_path / "m.csv").write_text("step,loss\n1,2.5\n2,x\n")
    cols = read_metrics_csv(tmp_path / "m.csv")
    assert cols["step"] == [1.0, 2.0] and cols["loss"][0] == 2.5 and cols["loss"][1] != cols["loss"][1]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    from PIL import Image

    path = build_report(fake_run(tmp_path))
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2600", path.as_uri()], check=True, timeout=120, capture_output=True)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2600)
    # the page is not blank: the embedded plots and table borders put many distinct colours on it
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50
    # the matplotlib default blue (31, 119, 180) of the histograms and curves is drawn
    assert any(abs(r - 31) < 12 and abs(g - 119) < 12 and abs(b - 180) < 12 for _, (r, g, b) in colours)
    # the tables' header cells (CSS background #eef) are drawn
    assert any((r, g, b) == (238, 238, 255) and n > 200 for n, (r, g, b) in colours)

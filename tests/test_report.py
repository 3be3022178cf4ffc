"""`disa report`: one self-contained HTML page from whatever a run or study folder holds."""

import json
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from disa import cli
from disa.report import (
    RUN_COLOURS,
    build_report,
    curve_figure,
    eval_files,
    markdown_to_html,
    metrics_files,
    read_metrics_csv,
    run_label,
    training_series,
)


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


DEMO_METHODS = ("aspo", "disa", "disa_affine", "disa_exact", "disa_group", "disa_labels", "flowrl", "flowrl_no_logz",
                "grpo", "gspo", "sft")


def fake_demo(root):
    """The shape of a `disa demo` folder: results.md at the top, one metrics.csv per method under seed0/ (sft's
    has no reward column, like the real one), each method's reward a different constant so lines can be told apart."""
    (root / "results.md").write_text("# Results\n\n| method | accuracy |\n|---|---|\n| disa | 0.25 |\n")
    for i, method in enumerate(DEMO_METHODS):
        folder = root / "seed0" / method
        folder.mkdir(parents=True)
        if method == "sft":
            (folder / "metrics.csv").write_text("step,epoch,loss\n1,1,0.8\n2,1,0.6\n")
        else:
            rows = "".join(f"{s},{0.1 * i + 0.01 * s},{1 - 0.1 * s}\n" for s in (1, 2, 3))
            (folder / "metrics.csv").write_text("step,reward_mean,loss\n" + rows)
    return root


def test_every_methods_curve_is_drawn_on_one_plot_per_metric(tmp_path):
    root = fake_demo(tmp_path)
    files = metrics_files(root)
    assert len(files) == len(DEMO_METHODS)  # not only the first 8 alphabetically
    series = training_series(root, files)
    assert list(series) == ["reward_mean", "loss"]
    assert set(series["loss"]) == {f"seed0/{m}" for m in DEMO_METHODS}
    assert set(series["reward_mean"]) == {f"seed0/{m}" for m in DEMO_METHODS if m != "sft"}
    fig = curve_figure(series["reward_mean"], "reward_mean")
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == list(series["reward_mean"])
    assert len({ln.get_color() for ln in lines}) == len(lines)  # every run its own colour
    grpo = next(ln for ln in lines if ln.get_label() == "seed0/grpo")
    i = DEMO_METHODS.index("grpo")
    assert list(grpo.get_xdata()) == [1.0, 2.0, 3.0]
    assert list(grpo.get_ydata()) == pytest.approx([0.1 * i + 0.01 * s for s in (1, 2, 3)])
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == list(series["reward_mean"])
    # past 20 runs the colours repeat but the line style changes
    many = {f"r{i}": ([1.0, 2.0], [0.0, float(i)]) for i in range(25)}
    styles = {(ln.get_color(), ln.get_linestyle()) for ln in curve_figure(many, "x").axes[0].get_lines()}
    assert len(styles) == 25 and len(RUN_COLOURS) == 20
    # a run keeps its colour on every plot of the page: sft (no reward column) is last in the loss plot's order
    order = list(series["loss"])
    loss_lines = curve_figure(series["loss"], "loss", order).axes[0].get_lines()
    reward_lines = curve_figure(series["reward_mean"], "reward_mean", order).axes[0].get_lines()
    assert {ln.get_label(): ln.get_color() for ln in reward_lines}.items() <= \
        {ln.get_label(): ln.get_color() for ln in loss_lines}.items()


def test_report_puts_the_results_table_first_and_lists_every_run(tmp_path):
    page = build_report(fake_demo(tmp_path)).read_text()
    assert page.index("<h2>Results</h2>") < page.index("<img")
    assert page.index("<h2>Results</h2>") < page.index("<h2>Training curves</h2>")
    assert "<td>disa</td><td>0.25</td>" in page
    assert page.count("data:image/png;base64,") == 2  # reward_mean and loss, each with every run on it
    for method in DEMO_METHODS:
        assert f"seed0/{method}" in page.split('alt="loss:')[1].split('"')[0]


def test_each_evaluation_is_shown_once(tmp_path):
    root = fake_run(tmp_path)
    latest = root / "eval" / "checkpoint-3" / "eval.md"
    (root / "eval.md").write_bytes(latest.read_bytes())  # `disa eval` copies the latest one to the top
    assert eval_files(root) == [latest]
    page = build_report(root).read_text()
    assert page.count("<td>Mean@4</td><td>0.5000</td>") == 1
    (root / "eval.md").write_text("# Evaluation\n\n| metric | value |\n|---|---|\n| Mean@4 | 0.2500 |\n")
    assert eval_files(root) == [root / "eval.md", latest]  # an older run's own top-level evaluation is kept
    # a folder of runs (`disa report runs`): every run's evaluations, each once
    other = root / "grpo_run"
    (other / "eval" / "checkpoint-9").mkdir(parents=True)
    (other / "eval" / "checkpoint-9" / "eval.md").write_text("# Evaluation\n")
    (other / "eval.md").write_text("# Evaluation\n")
    assert eval_files(root) == [root / "eval.md", latest, other / "eval" / "checkpoint-9" / "eval.md"]


def screenshot(page, tmp_path, height: int = 4000):
    """The page as headless Chromium draws it (Debian's `chromium`), as an (H, W, 3) uint8 array."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    import numpy as np
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size=1200,{height}",
                    page.as_uri()], check=True, timeout=120, capture_output=True)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (height, 1200, 3)
    assert not (img[-40:] < 250).any(), "the page is taller than the window: raise height"  # nothing cut off
    return img


def pixels_of(img, hex_colour: str, tolerance: int = 6):
    """Mask of the pixels within ``tolerance`` of a ``#rrggbb`` colour on every channel."""
    import numpy as np

    rgb = np.array([int(hex_colour[k:k + 2], 16) for k in (1, 3, 5)])
    return (np.abs(img.astype(int) - rgb) < tolerance).all(axis=-1)


def test_report_renders_in_headless_chromium_with_every_methods_curve(tmp_path):
    """On a demo-shaped folder: every method's curve is drawn (its colour covers more pixels than a legend swatch),
    a run whose values are all NaN shows its swatch only, and the results table comes before the first curve."""
    (tmp_path / "demo").mkdir()
    root = fake_demo(fake_run(tmp_path / "demo"))
    ghost = root / "seed0" / "zz_ghost"  # last in the colour order; nothing to draw
    ghost.mkdir()
    ghost.joinpath("metrics.csv").write_text("step,loss,reward_mean\n1,nan,nan\n2,nan,nan\n")
    img = screenshot(build_report(root), tmp_path)
    labels = [run_label(root, f) for f in metrics_files(root)]
    colour = {label: RUN_COLOURS[i % len(RUN_COLOURS)] for i, label in enumerate(labels)}
    assert len(labels) == len(DEMO_METHODS) + 2 and len(set(colour.values())) == len(labels)
    counts = {label: int(pixels_of(img, colour[label]).sum()) for label in labels}
    swatch = counts["seed0/zz_ghost"]
    assert 0 < swatch < 150, counts  # the legend's short line on each plot
    for method in DEMO_METHODS:
        assert counts[f"seed0/{method}"] > swatch + 200, (method, counts)  # a line across its plot
    # tables first: the header cells (CSS #eef) start above the first drawn curve
    header_rows = pixels_of(img, "#eeeeff", 1).any(axis=1).nonzero()[0]
    curve_rows = pixels_of(img, colour["seed0/disa"]).any(axis=1).nonzero()[0]
    assert header_rows.size and curve_rows.size and header_rows[0] < curve_rows[0]


def test_quick_demo_says_its_numbers_are_a_smoke_run_and_where_the_real_ones_are():
    from pathlib import Path

    from disa.demo_report import QUICK_NOTICE, results_markdown

    repo = Path(__file__).resolve().parents[1]
    results = json.loads((repo / "docs" / "results" / "demo-results.json").read_text())
    assert results["quick"] is False and QUICK_NOTICE not in results_markdown(results)
    quick = results_markdown({**results, "quick": True})
    assert f"**{QUICK_NOTICE}**" in quick and "not representative" in QUICK_NOTICE
    assert quick.replace(f"\n**{QUICK_NOTICE}**\n", "").replace("(quick)", "(full)") == results_markdown(results)
    assert (repo / "docs" / "results" / "demo.md").is_file() and "docs/results/demo.md" in QUICK_NOTICE

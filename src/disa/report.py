"""``disa report RUN_DIR``: one self-contained HTML page (plots embedded as base64 PNG, no external files).

It shows whatever the folder holds, tables first: a study's or the demo's ``results.md``, each evaluation once
(``eval/*/eval.md``, ``benchmarks.md``, with pass@k curves from ``eval.json``), then the training curves of every
``metrics.csv`` under the folder (one plot per metric, one line per run), Stage 1 labels (log Z and ESS
histograms), the Stage 2 regressor (loss curves, held-out MSE) and the folder's PNGs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

REPORT_FILE = "report.html"
_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
        "margin:.6em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
        "th{background:#eef}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}h2{border-bottom:2px solid #99c}")


# --------------------------------------------------------------------------- small pure helpers
def markdown_to_html(text: str) -> str:
    """Headings, pipe tables, images given as PNG data and paragraphs of a markdown file: what our .md outputs use."""
    out, table = [], []

    def flush() -> None:
        if table:
            rows = [[_bold(html.escape(c.strip())) for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in table
                    if not re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())]
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            table.append(line)
            continue
        flush()
        heading = re.match(r"^(#{1,4})\s+(.*)", line)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)
            out.append(f"<h{level}>{html.escape(heading.group(2))}</h{level}>")
        elif line.strip() and not line.strip().startswith("!["):
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def _bold(cell: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", cell)


def png_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _figure_png(draw) -> bytes:
    fig, ax = _pyplot().subplots(figsize=(5, 3.2), dpi=90)
    draw(ax)
    return figure_png(fig)


# Distinct colours for up to 20 runs on one axis (matplotlib's tab20, dark shades first); past 20 the line style
# changes too, so no two runs of a report look alike.
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
               "#dbdb8d", "#9edae5")
_LINE_STYLES = ("-", "--", ":", "-.")


def curve_figure(runs: dict[str, tuple[list[float], list[float]]], ylabel: str, order: Sequence[str] = ()):
    """One axis, one line per run (label -> (steps, values)), with a legend. A run's colour is its place in
    ``order`` (default: in ``runs``), so that it keeps its colour on every plot of a page."""
    fig, ax = _pyplot().subplots(figsize=(7.5, 3.6), dpi=90)
    order = list(order) or list(runs)
    for label, (x, y) in runs.items():
        i = order.index(label)
        ax.plot(x, y, color=RUN_COLOURS[i % len(RUN_COLOURS)],
                linestyle=_LINE_STYLES[(i // len(RUN_COLOURS)) % len(_LINE_STYLES)], linewidth=1.6, label=label)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def read_metrics_csv(path: Path) -> dict[str, list[float]]:
    """Numeric columns of a metrics CSV (non-numeric cells become NaN)."""
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return cols


# --------------------------------------------------------------------------- sections
def _labels_section(root: Path) -> list[str]:
    path = root / "labels.parquet"
    if not path.is_file():
        return []
    import pyarrow.parquet as pq

    t = pq.read_table(path).to_pydict()
    parts = ["<h2>Stage 1 labels</h2>", f"<p>{len(t.get('log_z', []))} prompts from {html.escape(str(path))}</p>"]
    for col, name in (("log_z", "log Z label"), ("ess", "effective sample size")):
        if col in t:
            parts.append(png_tag(_figure_png(lambda ax, c=col, n=name: (ax.hist(t[c], bins=30), ax.set(xlabel=n, ylabel="prompts"))), name))
    return parts


def _regressor_section(root: Path) -> list[str]:
    path = root / "log_z" / "report.json"
    if not path.is_file():
        return []
    rep = json.loads(path.read_text())
    hist = rep.get("history", [])
    parts = ["<h2>Stage 2 regressor</h2>", "<table><tr><th>held-out MSE</th><th>baseline MSE</th><th>R²</th>"
             "<th>train MSE</th><th>best epoch</th></tr><tr>" + "".join(
                 f"<td>{rep.get(k, float('nan')):.4g}</td>" for k in ("val_mse", "baseline_val_mse", "val_r2", "train_mse"))
             + f"<td>{rep.get('best_epoch', '')}</td></tr></table>"]
    if hist:
        def draw(ax):
            ax.plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], label="train")
            ax.plot([h["epoch"] for h in hist], [h["val_mse"] for h in hist], label="held-out")
            ax.set(xlabel="epoch", ylabel="MSE", yscale="log")
            ax.legend()
        parts.append(png_tag(_figure_png(draw), "regressor loss curves"))
    return parts


CURVE_KEYS = ("reward_mean", "loss", "accuracy", "kl", "log_z_mean", "reward")


def metrics_files(root: Path) -> list[Path]:
    """Every training ``metrics.csv`` under ``root`` (a run, a study or a demo folder), evaluations left out."""
    files = sorted(set(root.glob("**/metrics.csv")))
    return [f for f in files if "eval" not in f.relative_to(root).parts]


def run_label(root: Path, path: Path) -> str:
    """``seed0/grpo`` for ``root/seed0/grpo/metrics.csv``; a run's own ``checkpoints/`` folder is dropped."""
    folder = path.parent.relative_to(root)
    parts = [p for p in folder.parts if p != "checkpoints"]
    return "/".join(parts) or root.name


def training_series(root: Path, files: list[Path]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """metric -> run label -> (steps, values) for every file that has the metric: the metrics of
    :data:`CURVE_KEYS` any file has (up to 4), else the first three columns of the first file."""
    tables = {run_label(root, f): read_metrics_csv(f) for f in files}
    keys = [k for k in CURVE_KEYS if any(k in cols for cols in tables.values())][:4]
    if not keys and tables:
        keys = [k for k in next(iter(tables.values())) if k != "step"][:3]
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for key in keys:
        for label, cols in tables.items():
            if key in cols:
                values = cols[key]
                steps = cols.get("step") or [float(i) for i in range(1, len(values) + 1)]
                series.setdefault(key, {})[label] = (steps, values)
    return series


def _training_section(root: Path) -> list[str]:
    files = metrics_files(root)
    series = training_series(root, files)
    if not series:
        return []
    labels = [run_label(root, f) for f in files]
    parts = ["<h2>Training curves</h2>", f"<p>{len(files)} runs: " + ", ".join(map(html.escape, labels)) + "</p>"]
    for key, runs in series.items():
        parts.append(png_tag(figure_png(curve_figure(runs, key, labels)), f"{key}: " + ", ".join(runs)))
    return parts


def eval_files(root: Path) -> list[Path]:
    """Each evaluation's markdown once, in every run under ``root``: ``eval/*/eval.md`` (and benchmark
    sub-folders), plus a run's top-level ``eval.md`` only when it is not a copy of one of its ``eval/`` files
    (runs made before ``eval/`` existed)."""
    found = sorted(set(root.glob("**/eval/*/eval.md")) | set(root.glob("**/eval/*/*/eval.md"))
                   | set(root.glob("**/eval/*/benchmarks.md")))
    tops = [p for p in sorted(root.glob("**/eval.md")) if "eval" not in p.relative_to(root).parts[:-1]]
    for top in reversed(tops):
        copies = [f for f in found if f.name == "eval.md" and top.parent / "eval" in f.parents]
        if not any(f.read_bytes() == top.read_bytes() for f in copies):
            found.insert(0, top)
    return found


def _eval_section(root: Path) -> list[str]:
    parts = []
    for md in eval_files(root):
        parts += [f"<h3>{html.escape(str(md.relative_to(root)))}</h3>", markdown_to_html(md.read_text())]
        js = md.with_name("eval.json")
        if md.name == "eval.md" and js.is_file():
            curve = json.loads(js.read_text())["summary"].get("pass_curve")
            if curve and len(curve) > 1:
                parts.append(png_tag(_figure_png(lambda ax, c=curve: (ax.plot(range(1, len(c) + 1), c, "o-"),
                                                                      ax.set(xlabel="k", ylabel="pass@k", xscale="log"))),
                                     "pass@k curve"))
    return ["<h2>Evaluation</h2>", *parts] if parts else []


def _results_section(root: Path) -> list[str]:
    parts = []
    for md in sorted(root.glob("**/results.md"))[:12]:
        parts += [f"<h3>{html.escape(str(md.relative_to(root)))}</h3>", markdown_to_html(md.read_text())]
    return ["<h2>Results</h2>", *parts] if parts else []


def _figures_section(root: Path) -> list[str]:
    pngs = sorted(root.glob("**/*.png"))[:40]
    return ["<h2>Figures</h2>", *[png_tag(p.read_bytes(), str(p.relative_to(root))) for p in pngs]] if pngs else []


def build_report(run_dir, out: Optional[str] = None) -> Path:
    """Write the HTML page for ``run_dir`` (default ``run_dir/report.html``) and return its path."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder (give a run directory or a study output folder)")
    # tables first (a study's or the demo's results, then each evaluation once), then the curves and figures
    body = [*_results_section(root), *_eval_section(root), *_training_section(root), *_labels_section(root),
            *_regressor_section(root), *_figures_section(root)]
    if not body:
        raise FileNotFoundError(f"{root}: nothing to report (no labels.parquet, log_z/report.json, metrics.csv, "
                                "eval.md or results.md)")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>disa report: {html.escape(root.name)}</title>"
            f"<style>{_CSS}</style></head><body><h1>disa report: {html.escape(str(root))}</h1>\n"
            + "\n".join(body) + "\n</body></html>\n")
    from disa.io import atomic_write_text

    path = Path(out) if out else root / REPORT_FILE
    atomic_write_text(path, page)
    return path


def cli_study_or_report(args) -> int:
    """``disa study`` and ``disa report`` (kept here so that the CLI edit stays a few lines)."""
    if args.verb == "report":
        try:
            path = build_report(args.run_dir, args.out)
        except FileNotFoundError as err:
            print(f"disa report: {err}", file=sys.stderr)
            return 2
        print(f"[report] {path}")
        return 0
    from disa.studies import STUDIES, run_study

    if args.name not in STUDIES:
        print(f"disa study: unknown study {args.name!r}; choose from {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    out = args.out or f"runs/study-{args.name}"
    seeds = getattr(args, "seeds", 1)
    if seeds < 1:
        print(f"disa study: --seeds must be >= 1, got {seeds}", file=sys.stderr)
        return 2
    if args.config:
        from disa.config import load_config
        from disa.studies import run_study_from_config

        run_study_from_config(args.name, load_config(args.config, args.overrides), out, seeds=seeds)
    else:
        run_study(args.name, out, quick=args.quick, cache_dir=args.cache_dir, seeds=seeds,
                  build_threads=getattr(args, "build_threads", None))
    path = build_report(out)
    print(f"[study] {args.name} -> {out}/results.md, {path}")
    return 0

"""What every testbed study shares: the models and exact truths, and writing a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from disa.io import atomic_write_text, json_safe


def testbed_setup(quick: bool, cache_dir=None, eval_truths: bool = False, build_threads=None) -> dict:
    """The testbed's tokenizer, pi_ref, strong proposal and the exact truths of its training prompts (and, with
    ``eval_truths``, of its held-out prompts)."""
    from disa.demo import prompt_truths
    from disa.testbed import build_testbed

    tb = build_testbed(cache_dir, quick=quick, num_threads=build_threads)
    ref = tb.load_ref().requires_grad_(False)
    proposal = tb.load_proposal().requires_grad_(False)
    out = {"testbed": tb, "tokenizer": tb.tokenizer, "ref": ref, "proposal": proposal,
           "truths": prompt_truths(tb.train_prompts, ref, tb.tokenizer, "train-")}
    if eval_truths:
        out["eval_truths"] = prompt_truths(tb.eval_prompts, ref, tb.tokenizer, "eval-")
    return out


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, title: str, results: dict, tables: dict[str, tuple[list, list]], notes: str = "") -> None:
    """``results.json`` (everything) and ``results.md`` (one markdown table per entry of ``tables``)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(json_safe(results), indent=2) + "\n")
    parts = [f"# {title}", "", notes, ""] if notes else [f"# {title}", ""]
    for name, (rows, columns) in tables.items():
        parts += [f"## {name}", "", markdown_table(rows, columns)]
    images = sorted(p.name for p in out.glob("*.png"))
    parts += [f"![{p}]({p})" for p in images]
    atomic_write_text(out / "results.md", "\n".join(parts) + "\n")


def new_figure(ncols: int = 1, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, height), dpi=90)
    return plt, fig, axes


def legend_below(ax, ncol: int = 2) -> None:
    """The axis' legend under its x label, so it never covers the data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, fontsize=7, frameon=False)


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def beta_axis(ax, betas) -> None:
    """A log x axis whose ticks are exactly the betas swept, written plainly (no 2x10^0 minor labels)."""
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(list(betas), [f"{b:g}" for b in betas])


def seeds_phrase(seeds: int) -> str:
    return "one seed" if seeds == 1 else f"mean of {seeds} seeds"

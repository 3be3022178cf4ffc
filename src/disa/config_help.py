"""What ``disa config`` prints: every field of the config tree with its default and help, as rows or as a
commented starting YAML, then every registered objective with its hyperparameters."""

from __future__ import annotations

import dataclasses
import typing

import yaml

from disa.config import PipelineConfig


def describe(cls=PipelineConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(field path, default, help) for every field, then every registered objective's hyperparameters as
    ``train.objective_kwargs[<objective>].<name>``: what ``disa config`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        fpath = f"{prefix}{f.name}"
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, fpath + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((fpath, repr(default), f.metadata.get("help", "")))
    if cls is PipelineConfig:
        rows.extend(objective_rows())
        rows.extend(engine_rows())
    return rows


def engine_rows() -> list[tuple[str, str, str]]:
    """Every registered generation engine and its options (``<sample|train|eval>.generation.options.<name>``)."""
    import inspect

    from disa.generation.registry import engine_class, engine_names

    rows = []
    for name in engine_names():
        cls = engine_class(name)
        doc = (inspect.getdoc(cls) or "").split("\n")[0]
        rows.append((f"generation.engine={name}", cls.__module__, doc))
        for option, spec in sorted(cls.OPTIONS.items()):
            rows.append((f"  generation.options.{option}", repr(spec.default), spec.help))
    return rows


def objective_rows() -> list[tuple[str, str, str]]:
    import inspect

    from disa.objectives import OBJECTIVES

    rows = []
    for name in sorted(OBJECTIVES):
        spec = OBJECTIVES[name]
        doc = (inspect.getdoc(spec.fn) or "").split("\n")[0]
        source = f", log Z: {spec.log_z}" if spec.log_z else ""
        rows.append((f"train.objective={name}", spec.family + source, doc))
        for hp, default in sorted(spec.hyperparameters().items()):
            shown = "required" if default is inspect.Parameter.empty else repr(default)
            rows.append((f"  train.objective_kwargs.{hp}", shown, f"hyperparameter of {name}"))
    return rows



def starting_yaml() -> str:
    """Every field as a commented YAML config grouped by section (what ``disa config`` prints): each field's
    help as a comment above its default, so the output is a starting config that ``load_config`` reads."""
    import textwrap

    lines = ["# disa pipeline config: every field with its default; edit, save as a .yaml and run",
             "#   disa run -c CONFIG.yaml", "# Fields left at their default can be deleted.", ""]
    _yaml_section(PipelineConfig, "", lines, textwrap)
    lines += ["", "# Objectives (train.objective) and their hyperparameters (train.objective_kwargs):"]
    for path, default, help_text in objective_rows():
        lines.append(f"#   {path.strip()} ({default}){': ' + help_text if help_text else ''}")
    lines += ["", "# Generation engines (sample/train/eval .generation.engine) and their options (.generation.options):"]
    for path, default, help_text in engine_rows():
        lines.append(f"#   {path.strip()} ({default}){': ' + help_text if help_text else ''}")
    return "\n".join(lines) + "\n"


def _yaml_section(cls, indent: str, lines: list, textwrap) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        for chunk in textwrap.wrap(help_text, 110 - len(indent)):
            lines.append(f"{indent}# {chunk}")
        if dataclasses.is_dataclass(tp):
            lines.append(f"{indent}{f.name}:")
            _yaml_section(tp, indent + "  ", lines, textwrap)
            if not indent:
                lines.append("")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip()
        if value.endswith("\n..."):
            value = value[: -len("\n...")]
        value = value.removesuffix("...").strip()
        lines.append(f"{indent}{f.name}: {value}")

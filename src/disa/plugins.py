"""Plugins: a user's module that registers objectives (``@register_objective``), verifiers
(``@register_verifier``), generation engines (``@register_engine``) or benchmark loaders
(``@register_benchmark``) without editing the package: adding one is one new file. Named in the config
(``plugins: [my_pkg.losses, ./my_loss.py]``), or installed as an entry point in the group ``disa.plugins``; both
are imported before the config is validated, so ``train.objective: my_loss`` or ``eval.generation.engine:
my_engine`` works in every verb and shows in ``disa config``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable

ENTRY_POINT_GROUP = "disa.plugins"
_loaded: set[str] = set()


def load_plugins(names: Iterable[str] = ()) -> None:
    """Import every installed ``disa.plugins`` entry point, then each named module or ``.py`` file (once)."""
    from disa.config import ConfigError

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in _loaded:
            ep.load()
            _loaded.add(ep.value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"plugins: expected module names or .py paths, got {name!r}")
        if name in _loaded:
            continue
        try:
            if name.endswith(".py"):
                path = Path(name).expanduser().resolve()
                if not path.is_file():
                    raise ConfigError(f"plugins: {name!r} is not a file")
                spec = importlib.util.spec_from_file_location(f"disa_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import {name!r}: {e}") from None
        _loaded.add(name)

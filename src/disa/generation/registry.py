"""The engine registry: every generation back-end by name, in one place.

An engine is one file that defines a :class:`~disa.generation.engine.RolloutEngine` subclass and registers it::

    @register_engine("my_engine")
    class MyEngine(RolloutEngine): ...

The built-in ones (``hf``, ``vllm``, ``server``) live in ``disa/generation/{hf,vllm,server}.py`` and register on
import; a user's engine is a plugin file named in the config's ``plugins`` (:mod:`disa.plugins`). Consumers build
engines only through :func:`make_engine`, from a ``generation:`` config section or a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from disa.config import GenerationConfig
    from disa.generation.engine import RolloutEngine

_ENGINES: dict[str, type] = {}
# modules whose import registers the built-in engines (vllm.py imports vllm itself only when one is built)
_BUILTIN_MODULES = ("disa.generation.hf", "disa.generation.vllm", "disa.generation.server")
_builtins_loaded = False


def register_engine(name: str):
    """Class decorator: register a ``RolloutEngine`` subclass under ``name``."""
    from disa.generation.engine import RolloutEngine

    if not isinstance(name, str) or not name:
        raise ValueError(f"an engine name must be a non-empty string, got {name!r}")

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
            raise TypeError(f"register_engine({name!r}): {cls!r} is not a RolloutEngine subclass")
        if cls.create.__func__ is RolloutEngine.create.__func__:
            raise TypeError(f"register_engine({name!r}): {cls.__name__} must implement the classmethod create()")
        if name in _ENGINES and _ENGINES[name] is not cls:
            raise ValueError(f"engine {name!r} is already registered ({_ENGINES[name].__module__})")
        _ENGINES[name] = cls
        cls.engine_name = name
        return cls

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def engine_names() -> list[str]:
    _load_builtins()
    return sorted(_ENGINES)


def engine_class(name: str) -> type:
    """The registered class of engine ``name``; an unknown name lists the known ones."""
    _load_builtins()
    if name not in _ENGINES:
        raise KeyError(f"unknown generation engine {name!r}; known: {', '.join(sorted(_ENGINES))} (a plugin module "
                       "can register more with disa.generation.register_engine)")
    return _ENGINES[name]


def check_options(name: str, options: Mapping[str, Any], where: str = "generation.options") -> dict:
    """``options`` checked against engine ``name``'s ``OPTIONS`` (unknown name, bad value: an error naming it),
    with every default filled in."""
    cls = engine_class(name)
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: not an option of engine {name!r} (it takes "
                         f"{sorted(cls.OPTIONS) or 'none'})")
    out = {}
    for key, option in cls.OPTIONS.items():
        value = options.get(key, option.default)
        why = option.check(value) if option.check is not None else None
        if why:
            raise ValueError(f"{where}.{key}: {why}, got {value!r}")
        out[key] = value
    return out


def make_engine(
    section_or_name: Union["GenerationConfig", str],
    model,
    tokenizer=None,
    *,
    batch_size: int = 8,
    device: Optional[str] = None,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    **options,
) -> "RolloutEngine":
    """Build a rollout engine.

    ``section_or_name``: a ``generation:`` config section (``engine`` + ``options``) or an engine name.
    ``model``: a local model folder or a loaded ``nn.Module`` (a module given to an engine with
    ``loads_from_folder`` is located by its ``name_or_path``, then followed through ``sync_weights``).
    ``tokenizer``: the model's (needed with a module). ``batch_size`` (prompts per generation call),
    ``device`` (None: leave a given module where it is; a folder loads on ``auto``), ``dtype``, ``seed`` and
    ``progress`` are the consumer's settings every engine receives; ``options`` override the section's."""
    if isinstance(section_or_name, str):
        name, section_options = section_or_name, {}
    else:
        name, section_options = section_or_name.engine, dict(section_or_name.options)
    cls = engine_class(name)
    checked = check_options(name, {**section_options, **options})
    return cls.create(model, tokenizer, batch_size=batch_size, device=device, dtype=dtype, seed=seed,
                      progress=progress, **checked)


__all__ = ["register_engine", "make_engine", "engine_names", "engine_class", "check_options"]

"""Classes named by import path (``"package.module.Name"``), as configs and model directories name them.

One resolver for every place that turns a ``class_path`` into a class: the model directory loader
(``starkit.json``), the official-weights converter and the CLI's checkpoint check. A model directory may
come from anyone, so what it names is checked before anything is built: a class (not a function such as
``os.system``), of the kind the slot expects (a text encoder, a sampler, a positional encoding ... or at
least a ``torch.nn.Module`` for nested components), with one error naming the path, the slot and the fix.
"""
from __future__ import annotations

import importlib
from typing import Optional, Type

from torch import nn


#: where a class path without a module (``"StableSampler"``) is looked up, in this order
SHORT_NAME_PACKAGES = ("starkit.samplers", "starkit.text", "starkit.positional", "starkit.tokenizers")


def import_class(path: str, base: Optional[type] = None, what: str = "class_path") -> type:
    """The class at ``path``, checked to be a class and, given ``base``, a subclass of it.

    Args:
        path: ``"package.module.Name"``, or a class name of :data:`SHORT_NAME_PACKAGES`.
        base: the class the slot needs (None: any class).
        what: how the slot is named in errors (e.g. ``"starkit.json: text_encoder"``).

    Raises:
        ValueError: the path does not import, names nothing, names no class, or a class of another kind.
    """
    module_name, _, name = str(path).rpartition(".")
    if not name:
        raise ValueError(f"{what}: {path!r} is not an import path of a class (expected 'package.module.Name').")
    if not module_name:  # a short name, as in the YAML recipes: starkit's component packages
        obj = next((found for found in (getattr(importlib.import_module(package), name, None)
                                        for package in SHORT_NAME_PACKAGES) if found is not None), None)
        if obj is None:
            raise ValueError(f"{what}: no class {name!r} in {', '.join(SHORT_NAME_PACKAGES)}; give its full "
                             f"import path ('package.module.Name').")
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{what}: cannot import {module_name!r} for {path!r} ({err}); install the package "
                             f"that defines it or fix the class_path.") from None
        obj = getattr(module, name, None)
        if obj is None:
            raise ValueError(f"{what}: {module_name!r} has no {name!r}; fix the class_path.")
    if not isinstance(obj, type):
        raise ValueError(f"{what}: {path!r} is a {type(obj).__name__}, not a class: a config names classes only "
                         f"(refused, nothing was called).")
    if base is not None and not issubclass(obj, base):
        raise ValueError(f"{what}: {path!r} is not a {base.__module__}.{base.__qualname__} (refused, nothing was "
                         f"built); name a class of that kind.")
    return obj


def build_from_config(config: dict, base: Type = nn.Module, what: str = "class_path"):
    """An object from ``{"class_path": ..., "init_args": {...}}``, nested configs in ``init_args`` built too (each
    a ``torch.nn.Module``); the top-level class must subclass ``base``."""
    cls = import_class(config["class_path"], base, what)
    args = {key: (build_from_config(value, nn.Module, f"{what}.init_args.{key}")
                  if isinstance(value, dict) and "class_path" in value else value)
            for key, value in (config.get("init_args") or {}).items()}
    return cls(**args)


def is_related(a: str, b: str) -> bool:
    """Whether the classes at import paths ``a`` and ``b`` are the same or one subclasses the other; paths that do
    not resolve to classes are compared by their last name."""
    try:
        ca, cb = import_class(a), import_class(b)
    except ValueError:
        return a.rpartition(".")[2] == b.rpartition(".")[2]
    return issubclass(ca, cb) or issubclass(cb, ca)

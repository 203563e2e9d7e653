"""Hyperparameters that rebuild a generator from its checkpoint, and key checks on load.

Through the CLI, Lightning records the YAML config (``class_path`` dicts) as the
hyperparameters. When a generator is built in Python, :func:`library_hparams` turns the
component objects into the same kind of config dicts, so that every checkpoint holds
plain data (loadable with ``weights_only=True``) and ``load_from_checkpoint`` rebuilds
the whole model.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def class_path(obj) -> str:
    cls = obj if inspect.isclass(obj) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def component_config(value):
    """A config dict for a component object, a class, or a partial; other values as they are."""
    import torch
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [component_config(v) for v in value]
    if isinstance(value, functools.partial):  # ours, or jsonargparse's partial(wrapper, instantiator, cls, **kw)
        target = value.func if inspect.isclass(value.func) else next(
            (a for a in value.args if inspect.isclass(a)), value.func)
        return {"class_path": class_path(target), "init_args": dict(value.keywords)}
    if inspect.isclass(value):
        return {"class_path": class_path(value)}
    if isinstance(value, torch.nn.Module):
        init_args = dict(getattr(value, "hparams", {}) or {})
        init_args.pop("_instantiator", None)
        init_args.pop("_class_path", None)
        return {"class_path": class_path(value), "init_args": {k: component_config(v) for k, v in init_args.items()}}
    return value


def library_hparams(cls, local_vars: dict) -> Optional[dict]:
    """Config-dict hyperparameters when built outside LightningCLI, else None (the CLI's are used)."""
    if _given_hyperparameters.get() is not None:
        return None
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    hparams = {name: component_config(local_vars[name]) for name in names}
    hparams["_instantiator"] = INSTANTIATOR
    return hparams


def check_state_dict_keys(model, state_dict: dict) -> None:
    """Raise one clear error when a checkpoint's trainable keys do not match the model."""
    own_sd = model.state_dict()  # built once: it is needed for every key below
    own, given = set(own_sd), set(state_dict)
    missing = sorted(own - given)
    # a checkpoint may carry frozen weights this model loads from their own files instead
    unexpected = sorted(k for k in given - own if not k.startswith(("tokenizer.", "text_encoder.")))
    shape_mismatch = sorted(k for k in own & given if tuple(state_dict[k].shape) != tuple(own_sd[k].shape))
    if missing or unexpected or shape_mismatch:
        from starkit.utils.checkpoint_io import component_mismatches
        why = "".join(f"\n  {w}" for w in component_mismatches(own_sd, state_dict))

        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "") if keys else "none"
        raise RuntimeError(
            "The checkpoint does not match this generator's architecture.\n"
            f"  missing keys: {show(missing)}\n  unexpected keys: {show(unexpected)}\n"
            f"  shape mismatches: {show(shape_mismatch)}{why}\n"
            "Build the generator with the config the checkpoint was trained with (size, patch_nums, "
            "positional encoding, ema_decay), or start from it with `init_from` for a new resolution."
        )


class own_hyperparameters:
    """Context in which modules record their own arguments as hyperparameters, even when
    built inside a LightningCLI instantiation (which would hand them its config)."""

    def __enter__(self):
        self._token = _given_hyperparameters.set(None)
        return self

    def __exit__(self, *exc):
        _given_hyperparameters.reset(self._token)
        return False

"""The ``starkit`` command: a LightningCLI whose model and data are chosen by ``class_path``.

    starkit fit --config recipes/tokenizer/tiny.yaml
    starkit predict --config recipes/predict/demo.yaml
    python -m starkit ...

Extra subcommands that are not Trainer methods (``export``, ``convert``, ``tokenize``) are dispatched
before LightningCLI parses the arguments.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
from typing import List, Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, _InstantiatorFn

from starkit.utils.class_path import is_related

# Import every component module so that short class names resolve in YAML.
_COMPONENT_MODULES = (
    "starkit.tokenizers",
    "starkit.text",
    "starkit.positional",
    "starkit.samplers",
    "starkit.generator",
    "starkit.data",
    "starkit.callbacks",
    "starkit.eval",
    "starkit.pipeline",  # PretrainedGenerator: a model directory as a LightningModule (predict recipes)
)
for _name in _COMPONENT_MODULES:
    try:
        importlib.import_module(_name)
    except ModuleNotFoundError as err:  # a family not built yet must not break the others
        if err.name is None or not err.name.startswith("starkit"):
            raise

# Subcommands handled outside LightningCLI: name -> "module:function(argv)"
EXTRA_COMMANDS = {
    "export": "starkit.export:main",
    "convert": "starkit.convert.cli:main",
    "tokenize": "starkit.data.tokens:main",
}


DESCRIPTION = (
    "starkit: train, fine-tune and run STAR-style scale-wise text-to-image models. "
    "fit / validate / test / predict take a recipe (--config recipes/...yaml) and options (--help after the "
    "subcommand lists them; --model.help CLASS documents a component). "
    "Other commands: starkit export CKPT DIR (a checkpoint -> a model directory), starkit convert "
    "(official STAR / VAR weights -> a model directory), starkit tokenize (images -> token rows); each has --help."
)


class _TopLevelInstantiator(_InstantiatorFn):
    """Lightning records the YAML config as the hyperparameters of the module it builds.

    Its instantiator also fires for every nested LightningModule (our components: tokenizer,
    text encoder, sampler), which would then save the *generator's* config as their own
    hyperparameters. This one applies the config only to the class named in the YAML's
    top-level ``class_path``; nested components save their own arguments.
    """

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        self.cli._dump_config()
        top = self.cli.config_dump.get(self.key, {})
        top_path = top.get("class_path") if isinstance(top, dict) else None
        own_path = f"{class_type.__module__}.{class_type.__qualname__}"
        try:
            if top_path is not None and own_path != top_path and not top_path.endswith("." + class_type.__name__):
                return class_type(*args, **kwargs)
            return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links,
                                    **kwargs)
        except Exception as err:
            _name_bad_checkpoint_argument(class_type, kwargs, err)
            raise


CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")


def _name_bad_checkpoint_argument(class_type, kwargs: dict, err: Exception) -> None:
    """Building a component failed: if one of its checkpoint arguments (``pretrained``, ``init_from``, ...) is an
    empty, truncated or non-checkpoint file, raise that as the cause (torch.load says ``EOFError`` with no message,
    which jsonargparse even turns into an ``IndexError``). An error without a message gets the class's name."""
    from starkit.utils.checkpoint_io import NotACheckpointError, checkpoint_file_problem
    for key, value in kwargs.items():
        if isinstance(value, str) and value.lower().endswith(CHECKPOINT_SUFFIXES) and os.path.isfile(value):
            problem = checkpoint_file_problem(value)
            if problem:
                raise NotACheckpointError(f"{class_type.__name__}({key}={value!r}): the file is not a checkpoint: "
                                          f"{problem}.") from err
    if not str(err).strip():
        raise RuntimeError(f"building {class_type.__name__} failed with {type(err).__name__} (no message)") from err


class RunConfigSaver(SaveConfigCallback):
    """Saves the run's config next to its logs for fit/validate/test; prediction runs write
    only their images (no config.yaml dropped into the working directory)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":
            return
        super().setup(trainer, pl_module, stage)


class StarkitArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with a one-line usage before an error message: the error (a missing config file, an
    unknown option, a bad value) stays on the screen instead of following ~50 lines of every option; ``--help``
    still lists them all."""

    def print_usage(self, file=None) -> None:
        prog = self.prog.replace(" [options]", "")
        (file or sys.stdout).write(f"usage: {prog} [--config CONFIG] [options]\n")


class StarkitCLI(LightningCLI):
    """LightningCLI with starkit's defaults: any LightningModule / LightningDataModule by
    ``class_path``, configs saved next to the run (overwriting allowed)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("parser_class", StarkitArgumentParser)
        kwargs.setdefault("parser_kwargs", {"prog": "starkit", "description": DESCRIPTION,
                                            **{name: {"prog": f"starkit {name}"} for name in self.subcommands()}})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """Add :class:`~starkit.utils.AtomicCheckpointIO` (atomic writes, safe loads) unless the
        config already gives a checkpoint IO plugin."""
        from lightning.fabric.plugins import CheckpointIO

        from starkit.utils.checkpoint_io import AtomicCheckpointIO
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = plugins + [AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path``'s hyperparameters with ``weights_only=True``: a file that
        needs unsafe unpickling is refused with a message that says how to convert it; an empty, truncated or
        non-checkpoint file is named as such. Lightning then replaces the recipe's model by the checkpoint's
        class: a checkpoint of an unrelated class (a tokenizer's for a generator recipe) is refused first."""
        path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        try:
            if path and os.path.isfile(path):
                from starkit.utils.checkpoint_io import check_checkpoint_file
                check_checkpoint_file(str(path), "a checkpoint (--ckpt_path)")
                self._check_ckpt_class(str(path))
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            from starkit.utils.checkpoint_io import CONVERT_HINT, UnsafeCheckpointError
            raise UnsafeCheckpointError(f"refusing to load {str(path)!r}: it needs unsafe unpickling (torch.load "
                                        f"with weights_only=True failed).\n{CONVERT_HINT}") from err

    def _check_ckpt_class(self, path: str) -> None:
        import torch
        model = self.config[self.config.subcommand].get("model")
        recipe = model.get("class_path") if hasattr(model, "get") else None
        if not recipe:
            return
        try:  # memory-mapped: only the pickled dict is read, not the tensors
            ckpt = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped: Lightning reads it as it is
            return
        hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        saved = hparams.get("_class_path") if isinstance(hparams, dict) else None
        if saved and not is_related(recipe, saved):
            raise ValueError(
                f"--ckpt_path {path!r} is a checkpoint of {saved}, but the recipe's model is {recipe}: "
                f"--ckpt_path resumes or evaluates the same kind of model. Give a checkpoint written with this "
                f"recipe's model, or the recipe that wrote this one (to build a generator on a trained tokenizer, set "
                f"model.init_args.tokenizer.init_args.pretrained; to start from another generator's weights, "
                f"model.init_args.init_from).")

    def _check_data(self) -> None:
        from starkit.callbacks.guards import check_data_fits_model
        check_data_fits_model(self.model, self.datamodule)

    before_fit = before_validate = before_test = _check_data

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(_TopLevelInstantiator(cli=self, key="model"), L.LightningModule,
                                     subclasses=self.subclass_mode_model)
        self.parser.add_instantiator(_TopLevelInstantiator(cli=self, key="data"), L.LightningDataModule,
                                     subclasses=self.subclass_mode_data)


def main(args: Optional[List[str]] = None) -> Optional[StarkitCLI]:
    """Entry point of ``starkit`` and ``python -m starkit``."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        module, func = EXTRA_COMMANDS[argv[0]].split(":")
        getattr(importlib.import_module(module), func)(argv[1:])
        return None
    if args is None:
        # From the command line: LightningCLI reads sys.argv itself, and sys.argv stays whole, as
        # Lightning's multi-process launcher (DDP/FSDP, devices > 1) re-runs `sys.argv` for ranks >= 1.
        return StarkitCLI()
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # arguments come from `argv`; keeps LightningCLI from warning about both
    try:
        return StarkitCLI(args=argv)
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()


def error_summary(err: BaseException) -> str:
    """The cause of a failed command in one line: the first message jsonargparse collected while building
    the config's classes (its own error ends in a dump of the whole config), else the error's first line."""
    text = str(err)
    causes = [line.strip()[2:] for line in text.splitlines()
              if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
    first = causes[0] if causes else (text.splitlines()[0] if text.strip() else "")
    return f"{type(err).__name__}: {first}" if not causes else first


def run() -> None:
    """Console-script entry point (``starkit`` and ``python -m starkit``): runs :func:`main`, exits 0 on
    success (``main`` returns the CLI object, which ``sys.exit`` would print and turn into status 1). On an
    error, the traceback is printed, then the cause alone on the last line, and the status is 1."""
    import traceback
    try:
        main()
    except Exception as err:  # noqa: BLE001 - every error: the traceback stays, the cause comes last
        traceback.print_exc()
        print(f"\nstarkit: error: {error_summary(err)}", file=sys.stderr)
        sys.exit(1)

"""``torch.compile`` for the kit's optional compiled paths, with one clear error when compiling fails.

A compiled path (``generate(compile_blocks=True)``, ``StableSampler(compile_head=True)``,
``HFTextEncoder(compile=True)``) compiles at its first call; where the compiler itself cannot run
(no C++ compiler for inductor on the CPU, no or too old Triton for the GPU, an unsupported operator)
the user gets a message naming the option to turn off, not an inductor traceback. The compiled
objects are torch's own (an ``OptimizedModule`` for a module, so copies and pickles behave); the
message is added where they are called (:func:`compile_errors_named`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

BACKEND = "inductor"  # tests swap in a failing backend to check the message


#: Inductor options of the compiled inference regions on CUDA (the blocks' regions of
#: ``generate(compile_blocks=True)`` and the sampler head of ``StableSampler(compile_head=True)``); none by
#: default. ``{"triton.multi_kernel": 1}`` (a row reduction wider than 1024 gets a persistent and a looped
#: kernel, the faster chosen by timing) took fp8 at d30 @1024 batch 16 from 0.3081 to 0.3019 s/image on an H200
#: (docs/performance.md, eleventh comparison), but with torch 2.11 a later process that finds those graphs in
#: Inductor's FX graph cache fails to load them (``TypeError: 'NoneType' object does not support the context
#: manager protocol`` in ``MultiKernelCall.cache_file_path``): not a default.
INFERENCE_OPTIONS: dict = {}


def inference_options(device: torch.device) -> dict:
    """:data:`INFERENCE_OPTIONS` for code compiled for ``device`` (none off CUDA)."""
    return dict(INFERENCE_OPTIONS) if device.type == "cuda" else {}


def compile_once(fn: Callable, options: dict | None = None, **kwargs):
    """``torch.compile(fn, backend=BACKEND, options=options, **kwargs)`` of a plain function, built once per
    function, backend, options and arguments (a function holds no weights: one compiled object serves every
    model)."""
    return _compile_cached(fn, BACKEND, tuple(sorted(kwargs.items())), tuple(sorted((options or {}).items())))


@functools.lru_cache(maxsize=None)
def _compile_cached(fn: Callable, backend, kwargs: tuple, options: tuple = ()):
    return torch.compile(fn, backend=backend, **dict(kwargs), **({"options": dict(options)} if options else {}))


@contextlib.contextmanager
def recompile_limit(at_least: int):
    """Dynamo's per-function graph limit raised to ``at_least`` inside the block (``recompile_limit``, or
    ``cache_size_limit`` in older torch). A function compiled once for every model (:func:`compile_once`) gets
    a graph per shape family, model width and autocast state; past the default limit (8) dynamo would run
    the function uncompiled from then on, with only a log line."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: max(getattr(config, name), at_least)}):
        yield


#: device types on which :func:`tune_first_at` runs its call (Inductor's GPU kernels choose their launch
#: configuration by timing at their first launch; its CPU code does not). Tests add "cpu".
TUNE_DEVICE_TYPES = ("cuda",)
_TUNED: set = set()


def tune_first_at(key, device, call: Callable[[], object]) -> None:
    """Run ``call()`` once per ``key`` in this process on a GPU, before the compiled function it calls meets
    its real inputs. ``call`` runs that function at the largest shape it will be given.

    A graph compiled with symbolic sizes serves every scale, but each Triton kernel in it times its candidate
    launch configurations (block sizes per program) at its first launch and keeps the fastest for every later
    size; the size hints that pick the candidates also come from the first call. A graph first called at a
    small scale of a generation (a few tokens) keeps configurations that are several times slower at the
    large scales, where the time goes: on an H200 the QK-norm kernels of d30 @1024 ran 6-12x below the
    memory bandwidth, and tuning them at the largest scale took 3.9% off a batch-1 generation
    (docs/performance.md, eighth comparison). Not while a CUDA graph is being captured (the call would be
    recorded). Without the GPU memory for the call (its activations come on top of what is allocated), a
    warning, and the kernels are tuned at their first real call as before."""
    if key in _TUNED or torch.device(device).type not in TUNE_DEVICE_TYPES:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    try:
        call()
    except torch.cuda.OutOfMemoryError:
        import warnings
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        warnings.warn("No GPU memory for running the compiled code once at the largest scale before its first "
                      "call: its kernels are tuned at the first (small) scale instead, slower at the large scales. "
                      "A smaller batch leaves room for it.", stacklevel=2)
    _TUNED.add(key)


def compiled_module(owner: torch.nn.Module, key: str, module: torch.nn.Module, **kwargs):
    """``torch.compile(module, **kwargs)`` (an ``OptimizedModule``: copies and pickles with its module) kept
    in ``owner.__dict__[key]``, outside the module tree so that state dicts do not change; built at the
    first call and again when ``module`` was replaced."""
    held = owner.__dict__.get(key)
    if held is None or held[0] is not module:
        held = owner.__dict__[key] = (module, torch.compile(module, **kwargs))
    return held[1]


def _compiler_errors() -> tuple:
    exc = torch._dynamo.exc
    # ShortenTraceback: inductor's TritonMissing / GPUTooOldForTriton; BackendCompilerFailed: the C++
    # compiler and the backend's other failures (a subclass of ShortenTraceback in recent torch)
    return tuple(e for e in (getattr(exc, "ShortenTraceback", None), exc.BackendCompilerFailed) if e is not None)


@contextlib.contextmanager
def compile_errors_named(what: str, turn_off: str):
    """Run a compiled call; a compiler failure becomes a RuntimeError naming ``what`` was compiled and how
    to run without compiling (``turn_off``), with the original error as its cause."""
    try:
        yield
    except _compiler_errors() as err:
        inner = getattr(err, "inner_exception", None) or err
        raise RuntimeError(f"torch.compile could not compile {what} ({type(inner).__name__}: {str(inner)[:300]}). "
                           f"Run without it ({turn_off}), or install what the compiler needs (a C++ compiler on "
                           f"the CPU, Triton on the GPU).") from err

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
from typing import Callable

import torch

BACKEND = "inductor"  # tests swap in a failing backend to check the message


def compile_fn(fn: Callable, **kwargs):
    """``torch.compile(fn, backend=BACKEND, **kwargs)``."""
    return torch.compile(fn, backend=BACKEND, **kwargs)


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

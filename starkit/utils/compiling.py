"""``torch.compile`` for the kit's optional compiled paths, with one clear error when compiling fails.

A compiled path (``generate(compile_blocks=True)``, ``StableSampler(compile_head=True)``,
``HFTextEncoder(compile=True)``) compiles at its first call; where the compiler itself cannot run
(no C++ compiler for inductor on the CPU, no Triton for the GPU, an unsupported operator) the user
gets a message naming the option to turn off, not an inductor traceback.
"""
from __future__ import annotations

from typing import Callable

import torch

BACKEND = "inductor"  # tests swap in a failing backend to check the message


def compile_with_hint(fn: Callable, option: str, **kwargs) -> Callable:
    """``torch.compile(fn, backend=BACKEND, **kwargs)``; a compiler failure becomes a RuntimeError that
    names ``option`` (how to run without compiling) and keeps the original error as its cause."""
    compiled = torch.compile(fn, backend=BACKEND, **kwargs)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__  # a function's name, or a module's class

    def call(*args, **kw):
        try:
            return compiled(*args, **kw)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            raise RuntimeError(f"torch.compile could not compile {name} for {option} "
                               f"({type(err.inner_exception).__name__}: {str(err.inner_exception)[:300]}). "
                               f"Run without it ({option}=False), or install what the compiler needs (a C++ "
                               f"compiler on the CPU, Triton on the GPU).") from err
    return call

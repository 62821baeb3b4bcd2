"""Numerical kernels for the GRPO trainer: Triton kernels and their plain-torch references.

- `fused_logprob`, `fused_grpo_loss` (+ `token_weights`), `group_advantage`: Triton, on CUDA tensors (on the CPU
  only under TRITON_INTERPRET=1, set before triton is imported). Loaded on first use, so that `import grpo_kernels`
  stays light and does not import triton.
- `fused_logprob_ref`, `group_advantage_ref`: the torch references (any device).
- `triton_available(device)`: whether the Triton kernels can run on `device` in this process.

This package must not import from ``grpo`` or ``hpc``.
"""

import importlib

from .reference import fused_logprob_ref, group_advantage_ref

_LAZY = {
    "fused_logprob": "fused_logprob",
    "fused_grpo_loss": "grpo_loss",
    "token_weights": "grpo_loss",
    "group_advantage": "group_advantage",
}

__all__ = ["fused_logprob_ref", "group_advantage_ref", "triton_available", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def triton_available(device):
    """True when the Triton kernels can run on tensors of `device` (CUDA, or any device under the interpreter)."""
    try:
        from . import _lm_head
    except ImportError:  # no triton on this platform
        return False
    return _lm_head.INTERPRET or str(device).startswith("cuda")

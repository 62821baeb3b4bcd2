"""Numerical kernels for the GRPO trainer.

Currently only the plain-torch references live here; the Triton versions
``fused_logprob`` and ``group_advantage`` will be added later and are tested
against these. This package must not import from ``grpo`` or ``hpc``.
"""

from .reference import fused_logprob_ref, group_advantage_ref

__all__ = ["fused_logprob_ref", "group_advantage_ref"]

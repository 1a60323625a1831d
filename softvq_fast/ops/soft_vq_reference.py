"""The soft-VQ math as written in the authors' code: full tokens x codebook tensors, plain autograd.

This is the `reference` backend and the baseline of tests and benchmarks. Every backend returns
the same `SoftVQParts` (codebook-major layout, C codebooks of M rows each); `soft_vq` turns them
into the public outputs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class SoftVQParts(NamedTuple):
    """Per-codebook results of one soft-VQ call.

    z_q: (C, M, D) quantized rows, input dtype.
    row_entropy: (C, M) float32 entropy of each row's softmax at the entropy temperature.
    column_sum: (C, K) float32 sum over rows of that softmax.
    max_prob: (C, M) float32 largest probability of each row at temperature tau.
    indices: (C, M) int64 argmax code of each row.
    """

    z_q: torch.Tensor
    row_entropy: torch.Tensor
    column_sum: torch.Tensor
    max_prob: torch.Tensor
    indices: torch.Tensor


def reference_parts(
    z: torch.Tensor, codebook: torch.Tensor, tau: float, entropy_temperature: float, with_stats: bool,
    with_entropy: bool,
) -> SoftVQParts:
    """z (C, M, D), codebook (C, K, D) (already L2-normalised if requested). The logits see the
    codebook detached: it gets gradient only through the value path probs @ codebook. Indices and
    max probabilities come with `with_stats`, the entropy parts with `with_entropy` (else zeros)."""
    C, M, _ = z.shape
    K = codebook.shape[1]
    logits = torch.einsum("cmd,ckd->cmk", z, codebook.detach())
    probs = F.softmax(logits / tau, dim=-1)
    z_q = torch.einsum("cmk,ckd->cmd", probs, codebook)
    zero_rows = z.new_zeros(C, M, dtype=torch.float32)
    if not with_stats:
        return SoftVQParts(z_q, zero_rows, z.new_zeros(C, K, dtype=torch.float32), zero_rows,
                           torch.zeros(C, M, dtype=torch.long, device=z.device))
    max_prob, indices = probs.detach().amax(dim=-1), probs.detach().argmax(dim=-1)
    if not with_entropy:
        return SoftVQParts(z_q, zero_rows, z.new_zeros(C, K, dtype=torch.float32), max_prob.float(), indices)
    scaled = logits / entropy_temperature
    entropy_probs = F.softmax(scaled, dim=-1)
    log_probs = F.log_softmax(scaled + 1e-5, dim=-1)
    row_entropy = -(entropy_probs * log_probs).sum(dim=-1)
    return SoftVQParts(z_q, row_entropy.float(), entropy_probs.sum(dim=1).float(), max_prob.float(), indices)

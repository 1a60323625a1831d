"""The `cpu` backend of soft_vq: the fused algorithm in row blocks of PyTorch ops.

Each block of rows meets its codebook once; logits, probabilities and their gradients live only as
(rows_per_block, K) float32 scratch, so the workspace stays bounded whatever N is, and the block
stays in the cache across the elementwise steps that the reference streams through memory.
Backward recomputes the logits from the saved per-row log-sum-exps (FlashAttention style).
"""
from __future__ import annotations

import torch

# Rows per block: (ROWS x K) float32 scratch tensors (~4 MiB each at K = 8192) fit in L2/L3.
ROWS_PER_BLOCK = 128


def _row_blocks(rows: int):
    for start in range(0, rows, ROWS_PER_BLOCK):
        yield slice(start, min(start + ROWS_PER_BLOCK, rows))


def forward(
    z: torch.Tensor, codebook: torch.Tensor, tau: float, entropy_temperature: float, with_stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (C, M, D), codebook (C, K, D) -> z_q (C, M, D) in z's dtype, row_stats (4, C, M) float32,
    column_sum (C, K) float32, indices (C, M) int64 (see softvq_fast.ops.soft_vq.ROW_STATS).
    Without stats only z_q, the max logit and the log-sum at tau are filled (the rest are zeros)."""
    C, M, D = z.shape
    K = codebook.shape[1]
    z32, codebook32 = z.float(), codebook.float()
    z_q = torch.empty(C, M, D, dtype=torch.float32)
    row_stats = torch.zeros(4, C, M)
    column_sum = torch.zeros(C, K)
    indices = torch.zeros(C, M, dtype=torch.long)
    for c in range(C):
        codebook_t = codebook32[c].t()
        for rows in _row_blocks(M):
            logits = z32[c, rows] @ codebook_t
            top, top_index = logits.max(dim=-1, keepdim=True)
            shifted = logits.sub_(top)  # <= 0; kept apart from the max so that exp stays exact
            row_stats[0, c, rows] = top.squeeze(-1)
            if with_stats:
                indices[c, rows] = top_index.squeeze(-1)
                scaled = shifted * (1.0 / entropy_temperature)
                weights = scaled.exp()
                total = weights.sum(dim=-1)
                log_total = total.log()
                row_stats[2, c, rows] = log_total
                # entropy = log(total) - sum(w * scaled) / total
                row_stats[3, c, rows] = log_total - torch.linalg.vecdot(weights, scaled) / total
                column_sum[c] += total.reciprocal() @ weights
            weights = shifted.mul_(1.0 / tau).exp_()
            total = weights.sum(dim=-1)
            z_q[c, rows] = (weights @ codebook32[c]) / total.unsqueeze(-1)
            row_stats[1, c, rows] = total.log()
    return z_q.to(z.dtype), row_stats, column_sum, indices


def backward(
    grad_z_q: torch.Tensor,
    grad_row_entropy: torch.Tensor,
    grad_column_sum: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    z_q: torch.Tensor,
    row_stats: torch.Tensor,
    tau: float,
    entropy_temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of z and codebook (value path only) given the gradients of z_q (C, M, D) and, with
    `with_entropy`, of row_entropy (C, M) and column_sum (C, K) at the entropy temperature.

    With p = softmax(s / tau), q = softmax(s / T), h = row entropy of q and G = grad_column_sum:
      ds_j = p_j (g.E_j - g.z_q) / tau + q_j (G_j - sum_k q_k G_k - grad_h (log q_j + h)) / T.
    """
    C, M, D = z.shape
    z32, codebook32 = z.float(), codebook.float()
    g32, z_q32 = grad_z_q.float(), z_q.float()
    grad_z = torch.empty(C, M, D)
    grad_codebook = torch.zeros(codebook.shape)
    inv_t = 1.0 / entropy_temperature
    for c in range(C):
        codebook_t = codebook32[c].t()
        for rows in _row_blocks(M):
            g = g32[c, rows]
            shifted = (z32[c, rows] @ codebook_t).sub_(row_stats[0, c, rows].unsqueeze(-1))
            probs = (shifted * (1.0 / tau)).sub_(row_stats[1, c, rows].unsqueeze(-1)).exp_()
            g_dot_z_q = torch.linalg.vecdot(g, z_q32[c, rows]).unsqueeze(-1)
            grad_logits = (g @ codebook_t).sub_(g_dot_z_q).mul_(probs).mul_(1.0 / tau)
            grad_codebook[c] += probs.t() @ g
            if with_entropy:
                log_q = shifted.mul_(inv_t).sub_(row_stats[2, c, rows].unsqueeze(-1))
                q = log_q.exp()
                grad_h = grad_row_entropy[c, rows].unsqueeze(-1)
                mean_g = (q @ grad_column_sum[c]).unsqueeze(-1)
                inner = log_q.add_(row_stats[3, c, rows].unsqueeze(-1)).mul_(-grad_h)
                inner.add_(grad_column_sum[c]).sub_(mean_g)
                grad_logits.add_(inner.mul_(q), alpha=inv_t)
            grad_z[c, rows] = grad_logits @ codebook32[c]
    return grad_z.to(z.dtype), grad_codebook.to(codebook.dtype)

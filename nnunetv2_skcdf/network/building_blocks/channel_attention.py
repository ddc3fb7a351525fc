"""Channel-wise attention of the SKC module, in self and in cross (labelled <-> unlabelled) mode.

Token layout (used by every function here): ``(N, T, L, K)``

- ``N`` samples. In cross mode ``N = 2B``: ``[labelled B; unlabelled B]``.
- ``T`` independent groups per sample: window positions of the local SKC block, 1 for the global block.
- ``L`` tokens per group: the descriptor length (within-window positions, or the whole map).
- ``K`` channels.

The attention matrix is between *channels*, not tokens. Per sample and group, with ``Q, K, V`` arranged as
``(hK, L)`` (``h`` heads, projections ``K -> hK`` without bias)::

    A = softmax_rowwise(InstanceNorm(Q K^T))     # (hK, M), M = hK (self) or B*hK (cross)
    out = Linear_{hK -> K}((A V)^T)               # (L, K)

``InstanceNorm`` standardises the whole score matrix (mean 0, biased variance 1, eps 1e-5, no affine), as
``nn.InstanceNorm2d(1)`` on the matrix seen as a 1-channel image; it replaces the usual ``1/sqrt(d)`` scale.
The ``h`` heads are not split into separate ``K x K`` matrices: all ``hK`` projected channels form one score
matrix, in self mode as in cross mode, so the two modes differ only in where keys and values come from. (The
reference code splits heads in self mode but not in cross mode; the specification uses the unified form.)

Computation: softmax is invariant to a shift shared by a row, so ``softmax(InstanceNorm(S)) = softmax(S / sigma)``
with ``sigma`` the standard deviation of the whole score matrix (plus eps). ``sigma`` has a closed form in the
(L x L) Gram matrices of the centred queries and keys, so ``ChannelAttention`` scales the queries by
``1/sigma`` and calls PyTorch's fused ``scaled_dot_product_attention``: identical values and gradients
(tests compare it with the explicit ``channel_attention_weights``), without materialising, normalising and
storing the (hK x M) score matrices -- the dominant cost of the module on CPU and GPU.

Dropout: the specification applies dropout (0.1) to the output projection. The reference code also drops
attention weights; that is ``attention_dropout`` (default 0), which on CPU also rules out the fused kernel.

Cross mode: every labelled query attends to the keys/values of *all* unlabelled samples of the batch,
concatenated along the channel axis (score matrix ``hK x B*hK``), and every unlabelled query attends to all
labelled samples. The unlabelled half is detached before the projections, so no gradient reaches the
unlabelled tokens through the attention (neither through the keys/values the labelled queries read, nor
through the unlabelled queries); the labelled keys/values read by unlabelled queries keep their graph, as in
the reference (in SKCDF that half's output only yields pseudo labels, without gradient).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("self", "cross")
#: eps of ``nn.InstanceNorm2d`` (the reference's score normalisation)
SCORE_NORM_EPS = 1e-5


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_cross_batch(n: int) -> int:
    """-> B for a cross-mode batch of ``n = 2B`` samples ([labelled B; unlabelled B])."""
    if n < 2 or n % 2:
        raise ValueError(f"cross mode needs a batch [labelled B; unlabelled B] with an even number of samples "
                         f"(2B >= 2), got {n}")
    return n // 2


def detach_unlabeled_half(x: torch.Tensor) -> torch.Tensor:
    """(2B, ...) -> the same values, the second (unlabelled) half cut from the graph."""
    b = check_cross_batch(x.shape[0])
    return torch.cat((x[:b], x[b:].detach()), 0)


def channel_attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention between channels: ``softmax_rowwise(InstanceNorm(q k^T))``.

    q: (..., C, L) queries, k: (..., M, L) keys (leading dims broadcast) -> (..., C, M), rows sum to 1.
    Each (C, M) score matrix is normalised on its own, so a sample never depends on the other samples
    through the normalisation.
    """
    scores = q @ k.transpose(-1, -2)
    # layer_norm over the last two dims without affine == InstanceNorm2d(1) on the matrix as an image
    scores = F.layer_norm(scores, scores.shape[-2:], eps=SCORE_NORM_EPS)
    return scores.softmax(dim=-1)


def score_norm_scale(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(Var(q k^T) + eps)`` per score matrix, without forming it. q: (..., C, L), k: (..., M, L)
    (leading dims broadcast) -> (..., 1, 1), float32.

    With centred rows ``q' = q - mean_i q_i`` and ``k' = k - mean_j k_j`` the variance over all (i, j) is
    ``mean_j (qbar.k'_j)^2 + mean_i (q'_i.kbar)^2 + sum(G_q' * G_k') / (C M)`` (``G = x^T x``, L x L): three
    non-negative terms, so no cancellation. Computed in float32 even under autocast."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        q_mean, k_mean = q.mean(-2, keepdim=True), k.mean(-2, keepdim=True)  # (..., 1, L)
        qc, kc = q - q_mean, k - k_mean
        var = ((kc @ q_mean.transpose(-1, -2)).square().mean((-2, -1))
               + (qc @ k_mean.transpose(-1, -2)).square().mean((-2, -1))
               + ((qc.transpose(-1, -2) @ qc) * (kc.transpose(-1, -2) @ kc)).sum((-2, -1))
               / (q.shape[-2] * k.shape[-2]))
        return torch.rsqrt(var + SCORE_NORM_EPS)[..., None, None]


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax_rowwise(InstanceNorm(q k^T)) v`` through the fused attention kernel (see the module docstring).

    q: (..., C, L), k and v: (..., M, L), leading dims broadcast -> (..., C, L). ``dropout_p`` drops attention
    weights (pass 0 in eval mode)."""
    q = (q * score_norm_scale(q, k)).to(q.dtype)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    # (N', 1, *, L), contiguous: the fused kernels need unit stride on L (projections arrive transposed)
    flat = [t.expand(*batch, *t.shape[-2:]).reshape(-1, 1, *t.shape[-2:]).contiguous() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*flat, dropout_p=dropout_p, scale=1.0)
    return out.reshape(*batch, *out.shape[-2:])


def other_half_concat(x: torch.Tensor) -> torch.Tensor:
    """(2B, T, M, L) -> (2, 1, T, B*M, L): for each half, the *other* half's samples stacked along the
    channel axis (half 0 = labelled reads the unlabelled samples, half 1 the labelled ones). The singleton
    dim broadcasts over the B queries of a half."""
    two_b, t, m, l = x.shape
    b = two_b // 2
    other = x.reshape(2, b, t, m, l).flip(0)
    return other.permute(0, 2, 1, 3, 4).reshape(2, 1, t, b * m, l)


class ChannelAttention(nn.Module):
    """Multi-head channel-wise attention, tokens ``(N, T, L, K) -> (N, T, L, K)`` (see the module docstring).

    Args:
        channels: K.
        heads: h; the projections map K -> hK channels.
        dropout: rate of the dropout on the output projection (train mode only; the specification's 0.1).
        attention_dropout: rate of the dropout on the attention weights (train mode only; the reference code's
            extra regulariser, 0 by default: see the module docstring).
    """

    def __init__(self, channels: int, heads: int = 2, dropout: float = 0.1, attention_dropout: float = 0.0):
        super().__init__()
        if channels < 1 or heads < 1:
            raise ValueError(f"channels and heads must be >= 1, got channels={channels}, heads={heads}")
        for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.channels, self.heads = channels, heads
        inner = heads * channels
        self.q = nn.Linear(channels, inner, bias=False)
        self.k = nn.Linear(channels, inner, bias=False)
        self.v = nn.Linear(channels, inner, bias=False)
        self.out = nn.Linear(inner, channels, bias=False)
        self.attention_dropout = attention_dropout
        self.proj_dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections, as in the reference."""
        for linear in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(linear.weight)

    def forward(self, tokens: torch.Tensor, mode: str = "self") -> torch.Tensor:
        """tokens: (N, T, L, K) -> (N, T, L, K). ``mode="cross"`` needs N = 2B, [labelled; unlabelled]."""
        check_mode(mode)
        if tokens.ndim != 4 or tokens.shape[-1] != self.channels:
            raise ValueError(f"expected tokens (N, T, L, {self.channels}), got {tuple(tokens.shape)}")
        if mode == "cross":
            tokens = detach_unlabeled_half(tokens)
        q, k, v = self._project(tokens)
        if mode == "cross":
            q = q.reshape(2, -1, *q.shape[1:])  # (2, B, T, hK, L): the halves' queries
            k, v = other_half_concat(k), other_half_concat(v)  # (2, 1, T, B*hK, L)
        mixed = channel_attention(q, k, v, self.attention_dropout if self.training else 0.0)  # (..., hK, L)
        mixed = mixed.reshape(tokens.shape[:2] + mixed.shape[-2:]).transpose(-1, -2)  # (N, T, L, hK)
        return self.proj_dropout(self.out(mixed))

    def _project(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, T, L, K) -> q, k, v, each (N, T, hK, L): channels first, so that scores are channel x channel."""
        return tuple(proj(tokens).transpose(-1, -2) for proj in (self.q, self.k, self.v))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, attention_dropout={self.attention_dropout}"

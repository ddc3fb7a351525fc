"""Channel-wise attention of the SKC module, in self and in cross (labelled <-> unlabelled) mode.

Token layout (used by every function here): ``(N, T, L, K)``

- ``N`` samples. In cross mode ``N = B_l + B_u``: ``[labelled B_l; unlabelled B_u]``, the split point ``B_l``
  passed explicitly (``n_labelled``; default ``N / 2``).
- ``T`` independent groups per sample: window positions of the local SKC block, 1 for the global block.
- ``L`` tokens per group: the descriptor length (within-window positions, or the whole map).
- ``K`` channels.

The attention matrix is between *channels*, not tokens. Per sample and group, with ``Q, K, V`` arranged as
``(hK, L)`` (``h`` heads, projections ``K -> hK`` without bias)::

    A = softmax_rowwise(InstanceNorm(Q K^T))     # (hK, M), M = hK (self) or B_other*hK (cross)
    out = Linear_{hK -> K}((A V)^T)               # (L, K)

``InstanceNorm`` standardises the whole score matrix (mean 0, biased variance 1, eps 1e-5, no affine), as
``nn.InstanceNorm2d(1)`` on the matrix seen as a 1-channel image; it replaces the usual ``1/sqrt(d)`` scale.

Heads. Cross mode always uses one joint ``hK x M`` matrix (as the reference). Self mode has two forms
(``self_heads``):

- ``"joint"`` (default): all ``hK`` projected channels form one ``hK x hK`` score matrix, so self and cross
  mode differ only in where keys and values come from.
- ``"per_head"``: the reference code's self mode. The ``hK`` projected channels are split into ``h`` groups
  of ``K``; each group has its own ``K x K`` score matrix, normalised and softmaxed on its own (the
  reference's ``InstanceNorm2d(1)`` applied to an ``(N, h, K, K)`` tensor normalises every head's matrix
  separately). Which projected channels form a head differs between the reference's two blocks
  (``head_grouping``): its local block reads the projection as ``(c heads)``, so head ``g`` holds the
  channels ``j = c h + g`` (``j mod h == g``, ``"strided"``); its global block reads it as
  ``(heads c)``, head ``g`` holding ``j = g K + c`` (``j div K == g``, ``"blocked"``). Both write head ``g``'s
  output channel ``c`` back to position ``c h + g`` of the ``out`` projection's input: in place for the
  strided grouping, a permutation for the blocked one (the global block's ``out`` layer therefore sees
  channel ``g K + c`` of cross mode at input ``c h + g`` in self mode). With ``h = 1`` both forms equal the
  joint one. ``SKCBlock`` picks the reference's grouping per block kind.

Computation: softmax is invariant to a shift shared by a row, so ``softmax(InstanceNorm(S)) = softmax(S / sigma)``
with ``sigma`` the standard deviation of the whole score matrix (plus eps). ``sigma`` has a closed form in the
(L x L) Gram matrices of the centred queries and keys, so ``ChannelAttention`` scales the queries by
``1/sigma`` and calls PyTorch's fused ``scaled_dot_product_attention``: identical values and gradients
(tests compare it with the explicit ``channel_attention_weights``), without materialising, normalising and
storing the (hK x M) score matrices -- the dominant cost of the module on CPU and GPU. Per-head self mode is
the same call with the heads as a batch dimension.

Token mask (the local block on a padded bottleneck, see ``skc.py``): tokens outside the real map are left out
of every score ``Q K^T`` by zeroing their keys, so the scores, their InstanceNorm statistics (computed from the
masked keys) and hence the attention weights of every real token are those of the real tokens alone. A token's
output ``(A V)_l`` reads only its own values ``V_l``, so masked tokens need no other treatment here.

Dropout: the specification applies dropout (0.1) to the output projection, here in every mode and head form
(the reference's local block skips it in self mode, its global block does not). The reference code also drops
attention weights; that is ``attention_dropout`` (default 0), which on CPU also rules out the fused kernel.

Cross mode: every labelled query attends to the keys/values of *all* unlabelled samples of the batch,
concatenated along the channel axis (score matrix ``hK x B_u*hK``), and every unlabelled query attends to all
labelled samples (``hK x B_l*hK``). The unlabelled half is detached before the projections, so no gradient
reaches the unlabelled tokens through the attention (neither through the keys/values the labelled queries
read, nor through the unlabelled queries); the labelled keys/values read by unlabelled queries keep their
graph, as in the reference (in SKCDF that half's output only yields pseudo labels, without gradient). Equal
halves run as one fused call; unequal halves (``B_l != B_u``) as one call per half.

Cross-attention groups (``group``, the trainer's ``skc_cross_group``). The reference trained with 2 labelled + 2
unlabelled samples, where "all samples of the other half" are 2. Its cost grows with the square of the batch:
each of ``B`` queries per half reads ``B hK`` keys, so on nnU-Net's 2D plans (batch 8 to 100+) each sample
would pay 4 to 50+ times the reference's attention. With ``group = g`` the batch is cut into
``n_g = ceil(min(B_l, B_u) / g)`` groups: the labelled samples into ``n_g`` consecutive chunks of near-equal size
(the first ones one larger where they do not divide, as ``torch.tensor_split``), the unlabelled samples likewise,
and labelled chunk ``j`` reads only unlabelled chunk ``j`` (and the other way round). ``group=None``, or
``g >= min(B_l, B_u)``, is one group: the whole other half. With ``g = 2`` every group is the reference's batch
(2 + 2 where both halves are multiples of 2), so the per-sample cost no longer grows with the batch. Equal halves
that ``g`` divides run as one fused call; other splits as one call per group.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("self", "cross")
SELF_HEADS = ("joint", "per_head")
HEAD_GROUPINGS = ("strided", "blocked")
#: eps of ``nn.InstanceNorm2d`` (the reference's score normalisation)
SCORE_NORM_EPS = 1e-5


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_choice(name: str, value: str, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_cross_split(n: int, n_labelled: Optional[int] = None) -> int:
    """-> ``B_l`` for a cross-mode batch of ``n`` samples ``[labelled B_l; unlabelled n - B_l]``.

    ``n_labelled=None`` means equal halves (``n`` must be even)."""
    if n_labelled is None:
        if n < 2 or n % 2:
            raise ValueError(f"cross mode needs a batch [labelled B; unlabelled B] with an even number of samples "
                             f"(2B >= 2), got {n}; pass n_labelled for unequal halves")
        return n // 2
    if not 1 <= int(n_labelled) <= n - 1:
        raise ValueError(f"cross mode needs at least one labelled and one unlabelled sample: n_labelled must be in "
                         f"[1, {n - 1}] for a batch of {n}, got {n_labelled}")
    return int(n_labelled)


def detach_unlabeled_half(x: torch.Tensor, n_labelled: Optional[int] = None) -> torch.Tensor:
    """(B_l + B_u, ...) -> the same values, the unlabelled samples (from ``n_labelled`` on; default the second
    half) cut from the graph."""
    b = check_cross_split(x.shape[0], n_labelled)
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


def other_half_concat(x: torch.Tensor, group: Optional[int] = None) -> torch.Tensor:
    """(2B, T, M, L) -> (2, G, 1, T, g*M, L), ``G = B / g`` groups of ``g`` samples (``group=None``: ``g = B``,
    one group; ``g`` must divide ``B``): for each half and group, the *other* half's samples of that group
    stacked along the channel axis (half 0 = labelled reads the unlabelled samples, half 1 the labelled ones).
    The singleton dim broadcasts over the g queries of a half's group."""
    two_b, t, m, l = x.shape
    b = two_b // 2
    g = b if group is None else group
    other = x.reshape(2, b // g, g, t, m, l).flip(0)
    return other.permute(0, 1, 3, 2, 4, 5).reshape(2, b // g, 1, t, g * m, l)


def cross_groups(n_labelled: int, n_unlabelled: int, group: Optional[int] = None) -> int:
    """The number of cross-attention groups ``n_g`` (module docstring): ``ceil(min(B_l, B_u) / group)``, 1 for
    ``group=None``."""
    if group is None:
        return 1
    if int(group) < 1:
        raise ValueError(f"the cross-attention group must be None (the whole other half) or >= 1, got {group!r}")
    return -(-min(n_labelled, n_unlabelled) // int(group))


def samples_concat(x: torch.Tensor) -> torch.Tensor:
    """(B', T, M, L) -> (1, T, B'*M, L): the samples stacked along the channel axis (sample-major, the order of
    ``other_half_concat``); the singleton dim broadcasts over the queries that read them."""
    b, t, m, l = x.shape
    return x.permute(1, 0, 2, 3).reshape(1, t, b * m, l)


def _chunks(start: int, stop: int, n: int) -> list:
    """``range(start, stop)`` cut into ``n`` consecutive slices as ``torch.tensor_split`` cuts it (the first
    ``(stop - start) % n`` one longer)."""
    size, extra = divmod(stop - start, n)
    bounds = [start]
    for i in range(n):
        bounds.append(bounds[-1] + size + (i < extra))
    return [slice(a, z) for a, z in zip(bounds[:-1], bounds[1:])]


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_labelled: int,
                    dropout_p: float = 0.0, group: Optional[int] = None) -> torch.Tensor:
    """Cross mode: q, k, v (B_l + B_u, T, hK, L) -> (B_l + B_u, T, hK, L). Labelled queries read the keys/values
    of the unlabelled samples of their group, unlabelled queries those of the labelled samples of theirs
    (``group=None``: one group, the whole other half; module docstring)."""
    n, b = q.shape[0], n_labelled
    n_groups = cross_groups(b, n - b, group)
    if 2 * b == n and b % n_groups == 0:  # equal halves in equal groups: both directions in one fused call
        g = b // n_groups
        mixed = channel_attention(q.reshape(2, n_groups, g, *q.shape[1:]), other_half_concat(k, g),
                                  other_half_concat(v, g), dropout_p)  # (2, G, g, T, hK, L)
        return mixed.reshape(q.shape)
    mixed_l, mixed_u = [], []
    for il, iu in zip(_chunks(0, b, n_groups), _chunks(b, n, n_groups)):
        mixed_l.append(channel_attention(q[il], samples_concat(k[iu]), samples_concat(v[iu]), dropout_p))
        mixed_u.append(channel_attention(q[iu], samples_concat(k[il]), samples_concat(v[il]), dropout_p))
    return torch.cat(mixed_l + mixed_u, 0)


def split_heads(x: torch.Tensor, heads: int, grouping: str) -> torch.Tensor:
    """(..., hK, L) -> (..., h, K, L): head g's K projected channels (``"strided"``: j = c h + g;
    ``"blocked"``: j = g K + c; see the module docstring)."""
    *lead, hk, l = x.shape
    if grouping == "strided":
        return x.reshape(*lead, hk // heads, heads, l).transpose(-3, -2)
    return x.reshape(*lead, heads, hk // heads, l)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., h, K, L) -> (..., hK, L): head g's channel c at position c h + g (the reference's write-back for
    both groupings)."""
    *lead, h, k, l = x.shape
    return x.transpose(-3, -2).reshape(*lead, h * k, l)


class ChannelAttention(nn.Module):
    """Multi-head channel-wise attention, tokens ``(N, T, L, K) -> (N, T, L, K)`` (see the module docstring).

    Args:
        channels: K.
        heads: h; the projections map K -> hK channels.
        dropout: rate of the dropout on the output projection (train mode only; the specification's 0.1).
        attention_dropout: rate of the dropout on the attention weights (train mode only; the reference code's
            extra regulariser, 0 by default: see the module docstring).
        self_heads: ``"joint"`` (one hK x hK matrix in self mode) or ``"per_head"`` (the reference's h separate
            K x K matrices in self mode). Cross mode is joint either way.
        head_grouping: which projected channels form a head in per-head self mode, ``"strided"`` (the
            reference's local block) or ``"blocked"`` (its global block).
    """

    def __init__(self, channels: int, heads: int = 2, dropout: float = 0.1, attention_dropout: float = 0.0,
                 self_heads: str = "joint", head_grouping: str = "strided"):
        super().__init__()
        if channels < 1 or heads < 1:
            raise ValueError(f"channels and heads must be >= 1, got channels={channels}, heads={heads}")
        for name, rate in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        self.channels, self.heads = channels, heads
        self.self_heads = check_choice("self_heads", self_heads, SELF_HEADS)
        self.head_grouping = check_choice("head_grouping", head_grouping, HEAD_GROUPINGS)
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

    def forward(self, tokens: torch.Tensor, mode: str = "self", n_labelled: Optional[int] = None,
                token_mask: Optional[torch.Tensor] = None, cross_group: Optional[int] = None) -> torch.Tensor:
        """tokens: (N, T, L, K) -> (N, T, L, K).

        ``mode="cross"``: N = B_l + B_u, [labelled; unlabelled], split at ``n_labelled`` (default N / 2), read in
        groups of ``cross_group`` samples per half (None: the whole other half; module docstring).
        ``token_mask``: (T, L), 1 for real tokens and 0 for tokens left out of the scores (padding), or None."""
        check_mode(mode)
        if tokens.ndim != 4 or tokens.shape[-1] != self.channels:
            raise ValueError(f"expected tokens (N, T, L, {self.channels}), got {tuple(tokens.shape)}")
        if mode == "cross":
            n_labelled = check_cross_split(tokens.shape[0], n_labelled)
            # the attention's own guarantee (module docstring); inside SKCBlock, whose detach at its entrance also
            # covers the residual path and is the one the SKC module relies on, this is a no-op
            tokens = detach_unlabeled_half(tokens, n_labelled)
        q, k, v = self._project(tokens)
        if token_mask is not None:
            k = k * token_mask[:, None, :].to(k.dtype)  # (T, 1, L): masked tokens leave every score
        p = self.attention_dropout if self.training else 0.0
        if mode == "cross":
            mixed = cross_attention(q, k, v, n_labelled, p, cross_group)  # (N, T, hK, L)
        elif self.self_heads == "per_head" and self.heads > 1:
            q, k, v = (split_heads(x, self.heads, self.head_grouping) for x in (q, k, v))  # (N, T, h, K, L)
            mixed = merge_heads(channel_attention(q, k, v, p))
        else:
            mixed = channel_attention(q, k, v, p)
        return self.proj_dropout(self.out(mixed.transpose(-1, -2)))  # (N, T, L, hK) -> (N, T, L, K)

    def _project(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, T, L, K) -> q, k, v, each (N, T, hK, L): channels first, so that scores are channel x channel."""
        return tuple(proj(tokens).transpose(-1, -2) for proj in (self.q, self.k, self.v))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, heads={self.heads}, attention_dropout={self.attention_dropout}, "
                f"self_heads={self.self_heads}, head_grouping={self.head_grouping}")

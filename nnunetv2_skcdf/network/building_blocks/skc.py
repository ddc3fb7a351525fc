"""Semantic knowledge complementarity (SKC) module: channel-wise attention at the U-Net bottleneck.

Input and output: bottleneck features ``z`` of shape ``(N, K, *S)``, 2D (``S = (X, Y)``) or 3D
(``S = (Z, X, Y)``); ``S`` is fixed at construction (nnU-Net's bottleneck size: patch size / total encoder
stride per axis). ``mode="self"``: every sample on its own (unlabelled pass, inference).
``mode="cross"``: ``N = B_l + B_u`` samples ``[labelled B_l; unlabelled B_u]`` read each other (labelled pass);
the split point ``n_labelled = B_l`` is passed explicitly (default ``N / 2``), so the halves may differ in size.

One ``SKCBlock`` (window ``w``; ``S'`` = ``S`` padded up to a multiple of ``w``, ``G = S' / w`` window grid,
``T = prod(G)`` windows, ``P = prod(w)``):

1. Token learner, shared by all channels: every channel map ``(1, *S')`` is embedded on its own by a
   convolution with 1 input channel, ``kernel = stride = w`` and ``P`` output features -- a learned
   space-to-depth. Tokens ``(N, T, P, K)``: per window, ``P`` descriptor entries per channel. The global
   block is the same with ``w = S`` (``T = 1``, one descriptor of length ``prod(S)`` per channel). The tokens
   are also the residual.
2. LayerNorm over K, channel-wise attention (``channel_attention.py``), residual add, LayerNorm over K.
3. Inverse token map back to ``(N, K, *S')``: a transposed convolution (``P`` -> 1 channel per channel map,
   ``kernel = stride = w``), initialised to the exact depth-to-space (the reference's parameter-free
   rearrangement) and then learned; ``learned_inverse=False`` keeps the fixed rearrangement. Cropped to ``S``.
4. 1x1 convolution + GELU.

``SKCModule`` = local block then global block (``order="local_global"``, the paper's best); ablations:
``"global_local"`` and ``"parallel"`` (both blocks on the input, outputs summed).

Window rule (local block). The reference was built for a ``4 x 8 x 8`` bottleneck with ``2 x 2 x 2`` windows
(``P = 8`` tokens per window). Real nnU-Net plans give odd axes (Synapse-like CT: ``5 x 7 x 6``), where a
window that must divide ``S`` shrinks to 1 (``(1, 1, 2)``: 2 tokens per window, near-rank-1 score matrices, a
different module). So unless given, the window is the reference's 2 on every axis (``choose_window``; 1 on an
axis of size 1, where a window of 2 would be half padding everywhere), and the bottleneck is padded at the
far end of each axis up to a multiple of the window, then cropped after the block: ``5 x 7 x 6 -> 6 x 8 x 6``,
``T = 3 * 4 * 3`` windows of 8 tokens. An explicit window (``window=``, the trainer's ``skc_window``) may be any
size from 1 to ``S`` per axis and is padded the same way; ``window="divisor"`` selects the rule used before
padding existed (``divisor_window``: the largest divisor of ``S`` that is ``<= 2`` per axis, never padded), which
the checkpoints of that time need.

Padding is masked so that it does not change what the real positions compute. Every window keeps at least
one real position per axis (padding < ``w``), and token ``p`` of a window is the entry that the inverse map
writes to window position ``p`` (exactly so at initialisation, and for the fixed inverse): a token is *real*
when that position lies inside ``S``. A window with real positions ``R`` then computes exactly what the block
computes on the window ``R`` alone, with every kernel restricted to ``R``:

- token learner: padded input positions are set to 0 before the embedding (whatever the padding holds), so
  a real token is ``W[p, R] z_R``;
- LayerNorms: per token over the K channels -- they never mix tokens, so nothing to mask (padded tokens are
  normalised and then discarded);
- attention scores ``Q K^T`` sum over tokens: padded tokens' keys are zeroed, so every score, the score
  matrix's InstanceNorm mean and variance (computed from the masked keys) and the softmax see the real tokens
  only; a token's output reads only its own values, so the real outputs do not see padded values either;
- inverse map: padded tokens are zeroed before it (a learned inverse could otherwise write them onto real
  positions), then the padded positions are cropped; the 1x1 convolution acts per position.
Cost: the padded map has ``prod(S') / prod(S)`` times the positions (``6*8*6 / 5*7*6`` = 1.37 on the
Synapse-like plan), but the attention -- the block's main cost -- forms one ``hK x M`` score matrix per window,
and the reference window makes fewer windows than the old rule (on ``5 x 7 x 6``: 36 windows, 18 with 8 real
tokens, 15 with 4 and 3 with 2, instead of 105 of 2): the module is faster, not slower (measured by
``benchmarks/diagnostics/skc_window_cost.py``; benchmarks/diagnostics/README.md says where its figures are).
Where ``S`` is a multiple of the window nothing is padded or masked, and the block runs exactly the operations
it ran before padding existed (bit-identical results, tested on ``4 x 8 x 8``). The global block always works on
the whole unpadded map.

Heads in self mode: ``self_heads="joint"`` (one ``hK x hK`` score matrix, default) or ``"per_head"`` (the
reference code's ``h`` separate ``K x K`` matrices; the local block groups projected channels as the
reference's local block, ``j mod h``, the global block as its global block, ``j div K`` -- see
``channel_attention.py``). Cross mode uses one joint matrix in both settings.

Gradient rule in cross mode: each block detaches the unlabelled half at its entrance, so the whole
unlabelled half of the output (attention *and* residual path) is computed from detached unlabelled
features and no gradient reaches them from this module; parameters still receive gradient from both
halves. The specification requires this for the attention; extending it to the residual path changes
nothing in SKCDF (the unlabelled half of the labelled pass only yields pseudo labels, without gradient)
and makes the rule hold by construction.

Initialisation: the token learner and the 1x1 convolution keep PyTorch's default convolution init
(Kaiming-uniform with ``a = sqrt(5)``, std ``1 / sqrt(3 fan_in)``), the attention projections are
Xavier-uniform (the reference blocks' own init), the learned inverse starts as the identity rearrangement.
The reference's *training script* then re-initialises every ``Conv3d`` of its whole network with
Xavier-normal, the token learners and 1x1 convolutions included (std ``sqrt(2 / (P + P * prod(w)))``: 0.17
for the local, 0.0055 for the global token learner of a ``4 x 8 x 8`` bottleneck, against PyTorch's 0.20 and
0.036). We do not copy that: our encoder and decoders keep nnU-Net's own initialisation, not the reference's
network-wide one, and a smaller global token scale shifts the balance between the residual and the attention
output, a choice to be made by a convergence measurement, not by this module.

Eval mode in self mode: no operation mixes samples (LayerNorms are per token, the score normalisation is
per score matrix), so a sample's output does not depend on the rest of the batch.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_skcdf.network.building_blocks.channel_attention import (
    ChannelAttention,
    check_mode,
    detach_unlabeled_half,
)

Window = Union[int, Sequence[int], str]  # str: "divisor" (the rule before padding)
KINDS = ("local", "global")
ORDERS = ("local_global", "global_local", "parallel")
#: LayerNorm eps of the reference
NORM_EPS = 1e-6
#: the reference's local window per axis (2 x 2 x 2 on its 4 x 8 x 8 bottleneck)
REFERENCE_WINDOW = 2
CONV_OPS: Dict[int, Tuple[Type[nn.Module], Type[nn.Module]]] = {
    2: (nn.Conv2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.ConvTranspose3d),
}


# --------------------------------------------------------------------------------------------------
# shapes and windows
# --------------------------------------------------------------------------------------------------
def check_spatial_size(spatial_size: Sequence[int]) -> Tuple[int, ...]:
    size = tuple(int(s) for s in spatial_size)
    if len(size) not in CONV_OPS or min(size) < 1:
        raise ValueError(f"spatial_size must be 2 or 3 positive ints (2D or 3D bottleneck), got {list(spatial_size)}")
    return size


def _per_axis(value: Window, ndim: int, name: str) -> Tuple[int, ...]:
    values = (int(value),) * ndim if isinstance(value, numbers.Integral) else tuple(int(v) for v in value)
    if len(values) != ndim or min(values) < 1:
        raise ValueError(f"{name} must be a positive int or {ndim} positive ints, got {value}")
    return values


def choose_window(spatial_size: Sequence[int], preferred: Window = REFERENCE_WINDOW) -> Tuple[int, ...]:
    """The default window: per axis ``min(preferred, S_axis)`` -- the reference's 2, except on axes of size 1.
    The bottleneck is padded up to a multiple of it (see the module docstring).

    ``(4, 8, 8) -> (2, 2, 2)``, ``(5, 7, 6) -> (2, 2, 2)``, ``(1, 5, 4) -> (1, 2, 2)``, ``(3, 5) -> (2, 2)``.
    """
    size = check_spatial_size(spatial_size)
    limits = _per_axis(preferred, len(size), "preferred")
    return tuple(min(s, p) for s, p in zip(size, limits))


def divisor_window(spatial_size: Sequence[int], preferred: Window = REFERENCE_WINDOW) -> Tuple[int, ...]:
    """The rule before padding: per axis the largest divisor of ``S_axis`` that is ``<= preferred`` (1 on odd
    axes), a window that needs no padding. ``(4, 8, 8) -> (2, 2, 2)``, ``(5, 7, 6) -> (1, 1, 2)``."""
    size = check_spatial_size(spatial_size)
    limits = _per_axis(preferred, len(size), "preferred")
    return tuple(max(d for d in range(1, min(s, p) + 1) if s % d == 0) for s, p in zip(size, limits))


def resolve_window(spatial_size: Sequence[int], window: Optional[Window] = None) -> Tuple[int, ...]:
    """``window`` per axis (``None``: ``choose_window``; ``"divisor"``: ``divisor_window``); raises ValueError
    naming the axis where it exceeds S."""
    size = check_spatial_size(spatial_size)
    if window is None:
        return choose_window(size)
    if isinstance(window, str):
        if window != "divisor":
            raise ValueError(f"window must be None, 'divisor' or positive ints, got {window!r}")
        return divisor_window(size)
    win = _per_axis(window, len(size), "window")
    for axis, (s, w) in enumerate(zip(size, win)):
        if w > s:
            raise ValueError(f"window {list(win)} is larger than the bottleneck size {list(size)} on axis {axis} "
                             f"({w} > {s}); pass at most {s} on that axis or window=None for the default")
    return win


def padded_size(spatial_size: Sequence[int], window: Sequence[int]) -> Tuple[int, ...]:
    """S rounded up to a multiple of the window per axis: ``(5, 7, 6), (2, 2, 2) -> (6, 8, 6)``."""
    return tuple(-(-s // w) * w for s, w in zip(spatial_size, window))


def real_token_mask(spatial_size: Sequence[int], window: Sequence[int]) -> Optional[torch.Tensor]:
    """(T, P) bool: True where window position ``p`` of window ``t`` lies inside S (the ``window_blocks`` layout
    of the padded map); None when S needs no padding."""
    padded = padded_size(spatial_size, window)
    if padded == tuple(spatial_size):
        return None
    inside = torch.zeros(padded, dtype=torch.bool)
    inside[tuple(slice(0, s) for s in spatial_size)] = True
    return window_blocks(inside[None], window)[0]


def window_blocks(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(M, *S) -> (M, T, P): the T = prod(S / w) windows (C order), each flattened to P = prod(w) values
    (C order within the window) -- the input layout of a convolution with kernel = stride = w."""
    m, *size = x.shape
    d = len(size)
    grid = [s // w for s, w in zip(size, window)]
    x = x.reshape(m, *(v for g, w in zip(grid, window) for v in (g, w)))  # (M, G0, w0, G1, w1, ...)
    x = x.permute(0, *range(1, 2 * d, 2), *range(2, 2 * d + 1, 2))  # (M, G0, G1, ..., w0, w1, ...)
    return x.reshape(m, math.prod(grid), math.prod(window))


def unwindow_blocks(x: torch.Tensor, window: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """(M, T, P) -> (M, *S): the inverse of ``window_blocks``."""
    m, d = x.shape[0], len(size)
    grid = [s // w for s, w in zip(size, window)]
    x = x.reshape(m, *grid, *window)
    x = x.permute(0, *(v for axis in range(d) for v in (1 + axis, 1 + d + axis)))  # (M, G0, w0, G1, w1, ...)
    return x.reshape(m, *size)


# --------------------------------------------------------------------------------------------------
# token maps
# --------------------------------------------------------------------------------------------------
class TokenLearner(nn.Module):
    """Learned space-to-depth shared by all channels: (N, K, *S) -> tokens (N, T, P, K), T windows, P = prod(w)."""

    def __init__(self, window: Sequence[int]):
        super().__init__()
        self.window = tuple(window)
        # no bias: LayerNorm over K removes a per-token constant shared by all channels, in the attention input
        # and in the output norm, so a bias would never receive gradient
        self.proj = CONV_OPS[len(window)][0](1, math.prod(window), kernel_size=window, stride=window, bias=False)

    def forward(self, z: torch.Tensor, position_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z (N, K, *S') -> tokens (N, T, P, K). ``position_mask`` (T, P) bool: window positions to embed; the
        others (padding) are read as 0, whatever they hold."""
        n, k, *spatial = z.shape
        # the convolution (kernel = stride = w, 1 input channel) as one matmul over window blocks: the same
        # values and gradients, an order of magnitude faster than a 1-channel conv with a large kernel
        windows = window_blocks(z.reshape(n * k, *spatial), self.window)  # (N*K, T, P)
        if position_mask is not None:
            windows = torch.where(position_mask, windows, 0.0)
        x = windows @ self.proj.weight.reshape(self.proj.out_channels, -1).t()  # (N*K, T, P)
        return x.reshape(n, k, *x.shape[1:]).permute(0, 2, 3, 1)

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()  # PyTorch's default conv init (not the reference script's: module docstring)


class TokenInverse(nn.Module):
    """Tokens (N, T, P, K) -> (N, K, *S): the inverse layout of ``TokenLearner``.

    ``learned=True``: a transposed convolution P -> 1 per channel map (kernel = stride = w), initialised to
    the exact depth-to-space. ``learned=False``: the fixed depth-to-space of the reference.
    """

    def __init__(self, window: Sequence[int], spatial_size: Sequence[int], learned: bool = True):
        super().__init__()
        self.window, self.spatial_size = tuple(window), tuple(spatial_size)
        self.grid = tuple(s // w for s, w in zip(spatial_size, window))
        self.proj: Optional[nn.Module] = None
        if learned:
            # no bias: a constant shared by all channels is absorbed by the following 1x1 conv's bias
            self.proj = CONV_OPS[len(window)][1](math.prod(window), 1, kernel_size=window, stride=window, bias=False)
        self.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, p, k = tokens.shape
        x = tokens.permute(0, 3, 1, 2).reshape(n * k, t, p)  # (N*K, T, P)
        if self.proj is not None:  # the transposed convolution (kernel = stride = w) as one matmul
            x = x @ self.proj.weight.reshape(p, -1)
        return unwindow_blocks(x, self.window, self.spatial_size).reshape(n, k, *self.spatial_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.proj is not None:
            p = math.prod(self.window)
            self.proj.weight.copy_(torch.eye(p).reshape(self.proj.weight.shape))  # == the fixed rearrangement


# --------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------
class SKCBlock(nn.Module):
    """One SKC block (local: windows ``w``; global: ``w = S``), ``(N, K, *S) -> (N, K, *S)``.

    Args:
        channels: K.
        spatial_size: S (2 or 3 axes); the input must have exactly this size.
        window: local block only; ``None`` -> ``choose_window(S)``. At most S per axis; S is padded up to a
            multiple of it (masked, see the module docstring).
        heads, dropout, attention_dropout: of the channel attention.
        kind: ``"local"`` or ``"global"``.
        learned_inverse: learned (identity-initialised) or fixed inverse token map.
        self_heads: ``"joint"`` or ``"per_head"`` score matrices in self mode (``channel_attention.py``).
    """

    def __init__(self, channels: int, spatial_size: Sequence[int], window: Optional[Window] = None, heads: int = 2,
                 dropout: float = 0.1, kind: str = "local", learned_inverse: bool = True,
                 attention_dropout: float = 0.0, self_heads: str = "joint"):
        super().__init__()
        self.config = dict(channels=channels, spatial_size=spatial_size, window=window, heads=heads, dropout=dropout,
                           kind=kind, learned_inverse=learned_inverse, attention_dropout=attention_dropout,
                           self_heads=self_heads)  # to rebuild it with another window (SKCModule.set_local_window)
        self.channels, self.spatial_size, self.kind = channels, check_spatial_size(spatial_size), kind
        self.window = self._window(kind, self.spatial_size, window)
        self.padded_size = padded_size(self.spatial_size, self.window)
        # (T, P) real window positions / tokens; None without padding. Not in the state dict (derived from S, w)
        self.register_buffer("token_mask", real_token_mask(self.spatial_size, self.window), persistent=False)
        self.token_learner = TokenLearner(self.window)
        self.attn_norm = nn.LayerNorm(channels, eps=NORM_EPS)
        # the reference groups heads differently in its local and global blocks (channel_attention docstring)
        self.attention = ChannelAttention(channels, heads, dropout, attention_dropout, self_heads,
                                          "strided" if kind == "local" else "blocked")
        self.out_norm = nn.LayerNorm(channels, eps=NORM_EPS)
        self.token_inverse = TokenInverse(self.window, self.padded_size, learned_inverse)
        self.map_out = nn.Sequential(CONV_OPS[len(self.spatial_size)][0](channels, channels, kernel_size=1), nn.GELU())

    @staticmethod
    def _window(kind: str, spatial_size: Tuple[int, ...], window: Optional[Window]) -> Tuple[int, ...]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "local":
            return resolve_window(spatial_size, window)
        if window is not None and resolve_window(spatial_size, window) != spatial_size:
            raise ValueError(f"the global block's window is the whole map {list(spatial_size)}, got {window}")
        return spatial_size

    def forward(self, z: torch.Tensor, mode: str = "self", n_labelled: Optional[int] = None,
                cross_group: Optional[int] = None) -> torch.Tensor:
        """z: (N, K, *S) -> (N, K, *S); ``mode="cross"``: [labelled; unlabelled], split at ``n_labelled``
        (default N / 2), read in groups of ``cross_group`` samples per half (None: the whole other half;
        ``channel_attention``)."""
        check_mode(mode)
        self._check_input(z)
        if mode == "cross":
            # this detach carries the module's gradient guarantee (attention *and* residual path, module docstring);
            # ChannelAttention detaches again, a no-op here, so that it keeps its own guarantee when used alone
            z = detach_unlabeled_half(z, n_labelled)
        # padding: _pad's zeros are not what makes it harmless; the token learner's position mask is (it reads padded
        # positions as 0 whatever they hold: tested with NaN padding). _pad writes zeros only for a cheap, finite map
        tokens = self.token_learner(self._pad(z), self.token_mask)  # (N, T, P, K), also the residual
        x = self.out_norm(tokens + self.attention(self.attn_norm(tokens), mode, n_labelled, self.token_mask,
                                                          cross_group))
        if self.token_mask is not None:  # padded tokens must not reach real positions through a learned inverse
            x = torch.where(self.token_mask[..., None], x, 0.0)
        return self.map_out(self._crop(self.token_inverse(x)))

    def _pad(self, z: torch.Tensor) -> torch.Tensor:
        """(N, K, *S) -> (N, K, *S'), zeros at the far end of each axis (their value is never read)."""
        if self.token_mask is None:
            return z
        pads = [v for s, p in zip(reversed(self.spatial_size), reversed(self.padded_size)) for v in (0, p - s)]
        return F.pad(z, pads)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K, *S') -> (N, K, *S)."""
        if self.token_mask is None:
            return x
        return x[(slice(None), slice(None), *(slice(0, s) for s in self.spatial_size))]

    def _check_input(self, z: torch.Tensor) -> None:
        expected = (self.channels, *self.spatial_size)
        if tuple(z.shape[1:]) != expected:
            raise ValueError(f"SKC {self.kind} block built for (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(z.shape)}")

    def reset_parameters(self) -> None:
        """Re-apply this block's initialisation (e.g. after a network-wide init was applied to it)."""
        self.token_learner.reset_parameters()
        self.attention.reset_parameters()
        self.token_inverse.reset_parameters()
        for module in (self.attn_norm, self.out_norm, self.map_out[0]):
            module.reset_parameters()

    def extra_repr(self) -> str:
        padded = f", padded_size={self.padded_size}" if self.token_mask is not None else ""
        return f"kind={self.kind}, spatial_size={self.spatial_size}, window={self.window}{padded}"


class SKCModule(nn.Module):
    """Local and global SKC blocks, ``(N, K, *S) -> (N, K, *S)``; see the module docstring.

    Args:
        channels: K (the bottleneck's channels).
        spatial_size: S, the bottleneck size the plans produce (patch size / total stride per axis).
        heads: attention heads (reference 2).
        window: window of the local block (``None``: ``choose_window``, the reference's 2 per axis, with
            masked padding where S is not a multiple).
        dropout: dropout of the attention output (reference 0.1), train mode only.
        order: ``"local_global"`` (default), ``"global_local"`` or ``"parallel"``.
        learned_inverse: learned (identity-initialised) or fixed inverse token maps.
        attention_dropout: dropout of the attention weights (the reference code's 0.1; default 0, see
            ``channel_attention``), train mode only.
        self_heads: ``"joint"`` (default) or ``"per_head"`` (the reference code's) score matrices in self mode.
    """

    def __init__(self, channels: int, spatial_size: Sequence[int], heads: int = 2, window: Optional[Window] = None,
                 dropout: float = 0.1, order: str = "local_global", learned_inverse: bool = True,
                 attention_dropout: float = 0.0, self_heads: str = "joint"):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order, self.spatial_size = order, check_spatial_size(spatial_size)
        # fixed attribute names whatever the order, so state dicts of all orders have the same keys
        blocks = {kind: SKCBlock(channels, spatial_size, window if kind == "local" else None, heads, dropout, kind,
                                 learned_inverse, attention_dropout, self_heads) for kind in ("local", "global")}
        self.local_block, self.global_block = blocks["local"], blocks["global"]

    def forward(self, z: torch.Tensor, mode: str = "self", n_labelled: Optional[int] = None,
                cross_group: Optional[int] = None) -> torch.Tensor:
        """z: (N, K, *S) -> (N, K, *S); ``mode="cross"``: [labelled; unlabelled], split at ``n_labelled``
        (default N / 2), read in groups of ``cross_group`` samples per half (None: the whole other half)."""
        if self.order == "parallel":
            return self.local_block(z, mode, n_labelled, cross_group) + self.global_block(z, mode, n_labelled,
                                                                                          cross_group)
        first, second = ((self.local_block, self.global_block) if self.order == "local_global"
                         else (self.global_block, self.local_block))
        return second(first(z, mode, n_labelled, cross_group), mode, n_labelled, cross_group)

    def reset_parameters(self) -> None:
        self.local_block.reset_parameters()
        self.global_block.reset_parameters()

    def set_local_window(self, window: Window) -> None:
        """Rebuild the local block with another window (new parameters, same device, dtype and train/eval mode),
        e.g. to load a checkpoint trained with it. Parameters handed to an optimiser before are no longer used."""
        old = self.local_block
        reference = next(old.parameters())
        new = SKCBlock(**{**old.config, "window": window}).to(device=reference.device, dtype=reference.dtype)
        self.local_block = new.train(old.training)

    def extra_repr(self) -> str:
        return f"order={self.order}"

"""The SKCDF U-Net: nnU-Net's encoder, SKC at the bottleneck, two decoders with main + balanced heads.

Built from nnU-Net plans (``PlainConvUNet`` and the ``ResidualEncoderUNet`` of the ``nnUNetPlannerResEnc*``
presets): the plans' own network is instantiated with nnU-Net's ``get_network_from_plans`` (so its
initialisation is nnU-Net's), its encoder is shared, its decoder becomes ``D_l`` and an identically
configured, independently initialised decoder becomes ``D_u``. Each decoder has a main head ``H`` (nnU-Net's
``seg_layers``) and a balanced head ``H_b`` at every deep-supervision scale.

Paths (B labelled, B unlabelled samples; lists are nnU-Net's deep-supervision order, full resolution first):
- ``forward(x)``: inference -- encoder -> SKC(self) -> D_u -> H_u. A tensor (N, C, *patch) when deep
  supervision is off (what nnU-Net's predictor expects), the list of scales when it is on (online validation).
- ``forward_labelled(x_l, x_u)``: encoder on [x_l; x_u] -> SKC(cross) -> D_l -> (P, P_b) for all 2B samples,
  plus the encoder features of the unlabelled half for ``forward_unlabelled``.
- ``forward_unlabelled(features_u)``: SKC(self) -> D_u -> (Q, Q_b).

The SKC global block's kernel equals the bottleneck size, so the network takes exactly the plans' patch size
(nnU-Net always feeds patch-sized tiles, in training and in sliding-window inference).
"""
from __future__ import annotations

import copy
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nnunetv2_skcdf.network.building_blocks.skc import SKCModule

Outputs = Union[torch.Tensor, List[torch.Tensor]]


class DecoderWithBalancedHeads(nn.Module):
    """nnU-Net's ``UNetDecoder`` (upsampling stages, main heads) plus one balanced 1x1 head per scale."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        # UNetDecoder keeps a reference to the encoder as a submodule; a decoder must not own (or copy, or EMA)
        # the shared encoder, and its forward does not use it
        if "encoder" in decoder._modules:
            del decoder._modules["encoder"]
        self.stages, self.transpconvs, self.seg_layers = decoder.stages, decoder.transpconvs, decoder.seg_layers
        self.balanced_seg_layers = copy.deepcopy(decoder.seg_layers)
        self.deep_supervision = bool(decoder.deep_supervision)

    def forward(self, skips: Sequence[torch.Tensor]) -> Tuple[Outputs, Outputs]:
        """skips: encoder outputs, bottleneck last -> (main, balanced) logits, each a tensor or a list of scales."""
        x, main, balanced = skips[-1], [], []
        last = len(self.stages) - 1
        for s in range(len(self.stages)):
            x = self.stages[s](torch.cat((self.transpconvs[s](x), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == last:
                main.append(self.seg_layers[s](x))
                balanced.append(self.balanced_seg_layers[s](x))
        if not self.deep_supervision:
            return main[0], balanced[0]
        return main[::-1], balanced[::-1]


class SKCDFUNet(nn.Module):
    def __init__(self, encoder: nn.Module, decoder_l: DecoderWithBalancedHeads, decoder_u: DecoderWithBalancedHeads,
                 skc: nn.Module, num_classes: int):
        super().__init__()
        self.encoder, self.decoder_l, self.decoder_u, self.skc = encoder, decoder_l, decoder_u, skc
        # voxels per class of the labelled training cases (the keep-rates' source), filled once by the trainer;
        # a buffer so that every checkpoint carries it
        self.register_buffer("class_voxel_counts", torch.zeros(num_classes, dtype=torch.long))

    # -------------------------------------------------------------------------------------------- paths
    def forward(self, x: torch.Tensor) -> Outputs:
        skips = self.encoder(x)
        main, _ = self.decoder_u(self._with_bottleneck(skips, self.skc(skips[-1], mode="self")))
        return main

    def forward_labelled(self, x_l: torch.Tensor, x_u: torch.Tensor):
        """-> (P, P_b, features_u): D_l logits for all 2B samples ([labelled; unlabelled]), and the encoder
        outputs of the unlabelled half (with their graph) for ``forward_unlabelled``."""
        b = x_l.shape[0]
        skips = self.encoder(torch.cat((x_l, x_u), 0))
        main, balanced = self.decoder_l(self._with_bottleneck(skips, self.skc(skips[-1], mode="cross")))
        return main, balanced, [s[b:] for s in skips]

    def forward_unlabelled(self, features_u: Sequence[torch.Tensor]):
        """Encoder outputs of x_u -> (Q, Q_b) from D_u, SKC in self mode."""
        return self.decoder_u(self._with_bottleneck(features_u, self.skc(features_u[-1], mode="self")))

    @staticmethod
    def _with_bottleneck(skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> List[torch.Tensor]:
        return [*skips[:-1], bottleneck]

    # -------------------------------------------------------------------------------------------- training helpers
    @property
    def deep_supervision(self) -> bool:
        return self.decoder_u.deep_supervision

    def set_deep_supervision(self, enabled: bool) -> None:
        self.decoder_l.deep_supervision = self.decoder_u.deep_supervision = bool(enabled)

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """The method's EMA, in the reference order (one fused lerp per step):
        1. H_l <- m H_l + (1-m) H_l_b;  2. D_u <- m D_u + (1-m) D_l (every parameter, heads included);
        3. H_u <- m H_u + (1-m) H_u_b."""
        weight = 1.0 - momentum
        _lerp(self.decoder_l.seg_layers, self.decoder_l.balanced_seg_layers, weight)
        _lerp(self.decoder_u, self.decoder_l, weight)
        _lerp(self.decoder_u.seg_layers, self.decoder_u.balanced_seg_layers, weight)


def _lerp(target: nn.Module, source: nn.Module, weight: float) -> None:
    """target <- target + weight * (source - target) for every parameter and floating buffer, matched by name,
    with one fused ``_foreach_lerp_`` (no per-tensor Python kernel launches)."""
    t = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    s = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    if t.keys() != s.keys():
        raise RuntimeError("EMA between modules of different structure")
    keys = [k for k in t if t[k].is_floating_point()]
    torch._foreach_lerp_([t[k].data for k in keys], [s[k].data for k in keys], weight)


def bottleneck_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> List[int]:
    """Spatial size of the deepest encoder stage for ``patch_size`` (nnU-Net pads patches to be divisible)."""
    total = np.prod(np.array([np.broadcast_to(s, (len(patch_size),)) for s in strides]), axis=0)
    if any(p % t for p, t in zip(patch_size, total)):
        raise ValueError(f"patch size {list(patch_size)} is not divisible by the total stride {total.tolist()}")
    return [int(p // t) for p, t in zip(patch_size, total)]


def build_skcdf_unet(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Sequence[str],
                     input_channels: int, num_classes: int, patch_size: Sequence[int], deep_supervision: bool,
                     skc_heads: int = 2, skc_window=None, skc_order: str = "local_global",
                     skc_dropout: float = 0.1) -> SKCDFUNet:
    """SKCDF U-Net from a plans configuration's architecture block."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    def base():
        return get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                      num_classes, allow_init=True, deep_supervision=deep_supervision)

    plans_net = base()
    if not hasattr(plans_net, "encoder") or type(plans_net.decoder).__name__ != "UNetDecoder":
        raise ValueError(f"{arch_class_name}: SKCDF needs an encoder + UNetDecoder network (PlainConvUNet or "
                         f"ResidualEncoderUNet plans)")
    encoder = plans_net.encoder
    decoder_l = DecoderWithBalancedHeads(plans_net.decoder)
    decoder_u = DecoderWithBalancedHeads(base().decoder)  # same architecture, its own nnU-Net initialisation
    for head in (decoder_l.balanced_seg_layers, decoder_u.balanced_seg_layers):
        head.apply(type(plans_net).initialize)
    skc = SKCModule(encoder.output_channels[-1], bottleneck_size(patch_size, encoder.strides), heads=skc_heads,
                    window=skc_window, dropout=skc_dropout, order=skc_order)
    return SKCDFUNet(encoder, decoder_l, decoder_u, skc, num_classes)

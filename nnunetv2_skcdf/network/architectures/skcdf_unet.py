"""The SKCDF U-Net: nnU-Net's encoder, SKC at the bottleneck, two decoders with main + balanced heads.

Built from nnU-Net plans (``PlainConvUNet`` and the ``ResidualEncoderUNet`` of the ``nnUNetPlannerResEnc*``
presets): the plans' own network is instantiated with nnU-Net's ``get_network_from_plans`` (so its
initialisation is nnU-Net's), its encoder is shared, its decoder becomes ``D_l`` and an identically
configured, independently initialised decoder becomes ``D_u``. Each decoder has a main head ``H`` (nnU-Net's
``seg_layers``) and a balanced head ``H_b`` at every deep-supervision scale.

Paths (B_l labelled, B_u unlabelled samples, ``B_l != B_u`` allowed; lists are nnU-Net's deep-supervision order,
full resolution first):
- ``forward(x_l, x_u[, x_u_view])``: one training step's whole forward (``forward_labelled`` then
  ``forward_unlabelled``, on the encoder features of ``x_u_view`` when given) as
  a single call, so that DDP (one forward per backward, gradient hooks armed in ``forward``) and
  ``torch.compile`` wrap all of it -> ``TrainingPass``.
- ``forward(x)``: inference -- encoder -> SKC(self) -> D_u -> H_u. A tensor (N, C, *patch) when deep
  supervision is off (what nnU-Net's predictor expects), the list of scales when it is on (online validation).
- ``forward_labelled(x_l, x_u)``: encoder on [x_l; x_u] -> SKC(cross, split at B_l) -> D_l -> ``LabelledPass``:
  (P, P_b) of the labelled half with their graph, (P, P_b) of the unlabelled half without graph (they only make
  pseudo labels), and the encoder features of the unlabelled half for ``forward_unlabelled``. The split point
  B_l = ``len(x_l)`` is passed explicitly to the SKC module and used for the decoders, so both see the same
  halves whatever their sizes.
- ``forward_unlabelled(features_u)``: SKC(self) -> D_u -> (Q, Q_b).

The SKC global block's kernel equals the bottleneck size, so the network takes exactly the plans' patch size
(nnU-Net always feeds patch-sized tiles, in training and in sliding-window inference).
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnunetv2_skcdf.network.building_blocks.skc import SKCModule

Outputs = Union[torch.Tensor, List[torch.Tensor]]
#: the local token learner's weight (P, 1, *window): its kernel is the local window
LOCAL_WINDOW_KEY = "skc.local_block.token_learner.proj.weight"


class LabelledPass(NamedTuple):
    """Outputs of ``SKCDFUNet.forward_labelled`` for B_l labelled + B_u unlabelled samples (each a tensor or a
    list of deep-supervision scales, full resolution first)."""
    main: Outputs                  # P[:B_l], D_l main head on the labelled half, with graph (L_sup)
    balanced: Optional[Outputs]    # P_b[:B_l], D_l balanced head on the labelled half, with graph (L_sup)
    main_u: Outputs                # P[B_l:], D_l main head on the unlabelled half, no graph (pseudo labels p)
    balanced_u: Optional[Outputs]  # P_b[B_l:], D_l balanced head, unlabelled half, no graph (pseudo labels p_b)
    features_u: List[torch.Tensor]  # encoder outputs of x_u, with graph (input of forward_unlabelled)


class DecoderWithBalancedHeads(nn.Module):
    """nnU-Net's ``UNetDecoder`` (upsampling stages, main heads) plus one balanced 1x1 head per scale
    (``balanced=False``: none, the no-ABC ablation; the balanced outputs are then ``None``)."""

    def __init__(self, decoder: nn.Module, balanced: bool = True):
        super().__init__()
        # UNetDecoder keeps a reference to the encoder as a submodule; a decoder must not own (or copy, or EMA)
        # the shared encoder, and its forward does not use it
        if "encoder" in decoder._modules:
            del decoder._modules["encoder"]
        self.stages, self.transpconvs, self.seg_layers = decoder.stages, decoder.transpconvs, decoder.seg_layers
        self.balanced_seg_layers = copy.deepcopy(decoder.seg_layers) if balanced else None
        self.deep_supervision = bool(decoder.deep_supervision)

    @property
    def has_balanced_heads(self) -> bool:
        return self.balanced_seg_layers is not None

    def forward(self, skips: Sequence[torch.Tensor]) -> Tuple[Outputs, Optional[Outputs]]:
        """skips: encoder outputs, bottleneck last -> (main, balanced) logits, each a tensor or a list of scales
        (balanced ``None`` without balanced heads)."""
        x, main, balanced = skips[-1], [], []
        last = len(self.stages) - 1
        for s in range(len(self.stages)):
            x = self.stages[s](torch.cat((self.transpconvs[s](x), skips[-(s + 2)]), 1))
            if self.deep_supervision or s == last:
                main.append(self.seg_layers[s](x))
                if self.has_balanced_heads:
                    balanced.append(self.balanced_seg_layers[s](x))
        if not self.deep_supervision:
            return main[0], (balanced[0] if balanced else None)
        return main[::-1], (balanced[::-1] if balanced else None)


class PlainBottleneck(nn.Module):
    """The no-SKC ablation: the bottleneck features pass unchanged, ``(N, K, *S) -> (N, K, *S)``, any mode."""

    def forward(self, z: torch.Tensor, mode: str = "self", n_labelled: Optional[int] = None) -> torch.Tensor:
        return z


class TrainingPass(NamedTuple):
    """Outputs of ``SKCDFUNet.forward(x_l, x_u)``: the labelled pass (see ``LabelledPass``) and the unlabelled
    pass ``(Q, Q_b)`` through D_u."""
    main: Outputs
    balanced: Optional[Outputs]
    main_u: Outputs
    balanced_u: Optional[Outputs]
    unlabelled_main: Outputs                # Q, with graph (L_u)
    unlabelled_balanced: Optional[Outputs]  # Q_b, with graph (L_u)


class SKCDFUNet(nn.Module):
    """See the module docstring. Ablations: ``decoder_u=None`` shares ``D_l`` as ``D_u`` (no decoupling: one
    decoder learns from labels and pseudo labels); ``labelled_attention_mode="self"`` runs the SKC module in
    self mode in the labelled pass (self- instead of cross-attention); a ``PlainBottleneck`` as ``skc``
    removes the SKC module; decoders without balanced heads remove the ABC heads."""

    def __init__(self, encoder: nn.Module, decoder_l: DecoderWithBalancedHeads,
                 decoder_u: Optional[DecoderWithBalancedHeads], skc: nn.Module, num_classes: int,
                 labelled_attention_mode: str = "cross"):
        super().__init__()
        if labelled_attention_mode not in ("cross", "self"):
            raise ValueError(f"labelled_attention_mode must be 'cross' or 'self', got {labelled_attention_mode!r}")
        self.encoder, self.decoder_l, self.skc = encoder, decoder_l, skc
        # without decoupling the same module is registered twice: parameters() lists it once (one optimiser
        # entry), and the state dict keeps both prefixes so that every variant's checkpoint has the same layout
        self.decoder_u = decoder_l if decoder_u is None else decoder_u
        self.labelled_attention_mode = labelled_attention_mode
        # voxels per class of the labelled training cases (the keep-rates' source), filled once by the trainer;
        # a buffer so that every checkpoint carries it
        self.register_buffer("class_voxel_counts", torch.zeros(num_classes, dtype=torch.long))
        # ema_update's tensor lists per couple_decoders flag, built on first use (see _ema_steps)
        self._ema_cache: Dict[bool, Tuple[List[str], List[Tuple[List[torch.Tensor], List[torch.Tensor]]]]] = {}

    # -------------------------------------------------------------------------------------------- paths
    def forward(self, x: torch.Tensor, x_u: Optional[torch.Tensor] = None,
                x_u_view: Optional[torch.Tensor] = None) -> Union[Outputs, TrainingPass]:
        """``forward(x)``: inference logits of D_u's main head. ``forward(x_l, x_u)``: the training pass.
        ``x_u_view`` (opt-in student view): D_u's unlabelled pass runs on this perturbed copy of ``x_u`` (its own
        encoder pass) while the pseudo labels still come from ``x_u``; without it D_u reuses x_u's features."""
        if x_u is not None:
            labelled = self.forward_labelled(x, x_u)
            features = labelled.features_u if x_u_view is None else self.encoder(x_u_view)
            return TrainingPass(*labelled[:4], *self.forward_unlabelled(features))
        skips = self.encoder(x)
        main, _ = self.decoder_u(self._with_bottleneck(skips, self.skc(skips[-1], mode="self")))
        return main

    def forward_labelled(self, x_l: torch.Tensor, x_u: torch.Tensor) -> LabelledPass:
        """Labelled ("complementarity") pass of B_l labelled and B_u unlabelled samples, see ``LabelledPass``.

        D_l's outputs for the unlabelled half only become pseudo labels (argmax, no gradient), so that half goes
        through D_l without a graph: the same values and the same gradients as one (B_l + B_u)-sample decoder
        pass (D_l's per-sample instance norms do not mix samples), without storing activations or running a
        backward pass for B_u samples that would only receive zero gradient."""
        b = x_l.shape[0]
        skips = self.encoder(torch.cat((x_l, x_u), 0))
        bottleneck = self.skc(skips[-1], mode=self.labelled_attention_mode, n_labelled=b)
        decoder_input = self._with_bottleneck(skips, bottleneck)
        if self._decoder_mixes_samples:  # batch norm: its statistics need the joint batch
            main, balanced = self.decoder_l(decoder_input)
            main, main_u = _split(main, b)
            balanced, balanced_u = _split(balanced, b)
            return LabelledPass(main, balanced, _detach(main_u), _detach(balanced_u), [s[b:] for s in skips])
        main, balanced = self.decoder_l([s[:b] for s in decoder_input])
        with torch.no_grad():
            main_u, balanced_u = self.decoder_l([s[b:] for s in decoder_input])
        return LabelledPass(main, balanced, main_u, balanced_u, [s[b:] for s in skips])

    def forward_unlabelled(self, features_u: Sequence[torch.Tensor]):
        """Encoder outputs of x_u -> (Q, Q_b) from D_u, SKC in self mode."""
        return self.decoder_u(self._with_bottleneck(features_u, self.skc(features_u[-1], mode="self")))

    @property
    def _decoder_mixes_samples(self) -> bool:
        return any(isinstance(m, _BatchNorm) for m in self.decoder_l.modules())

    @staticmethod
    def _with_bottleneck(skips: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> List[torch.Tensor]:
        return [*skips[:-1], bottleneck]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with a clear message when the checkpoint belongs to another dataset,
        configuration or SKCDF variant (PyTorch's own message lists tensor sizes only). A checkpoint whose local
        SKC window differs from this network's (trained with release 0.2 or older, when windows had to divide the
        bottleneck) is loaded into a local block rebuilt with the checkpoint's window, so old model folders still
        predict and validate; the trainer refuses to resume training such a network (``on_train_start``)."""
        self._adopt_checkpoint_window(state_dict)
        self._ema_cache = {}  # assign=True puts the checkpoint's tensors in place of the cached ones
        mismatch = _first_mismatch(self.state_dict(), state_dict) if strict else None
        if mismatch:
            raise RuntimeError(
                f"this checkpoint does not fit the network built from these plans and dataset.json: {mismatch}. "
                f"The checkpoint was trained on another dataset, configuration or SKCDF variant (-tr). Predict "
                f"with the model folder of the dataset you give to -d (nnUNet_results/DatasetXXX/"
                f"<trainer>__<plans>__<configuration>), or retrain on this dataset.")
        return super().load_state_dict(state_dict, strict, assign)

    def _adopt_checkpoint_window(self, state_dict) -> None:
        """Rebuild the local SKC block with the window of the checkpoint's local token learner, if it differs
        (its kernel is the window: weight (P, 1, *w))."""
        weight = state_dict.get(LOCAL_WINDOW_KEY)
        if not isinstance(self.skc, SKCModule) or weight is None or weight.ndim != 2 + len(self.skc.spatial_size):
            return
        window = tuple(weight.shape[2:])
        if window != self.skc.local_block.window and weight.shape[0] == math.prod(window) \
                and all(w <= s for w, s in zip(window, self.skc.spatial_size)):
            warnings.warn(f"the checkpoint's local SKC window is {list(window)}, not the "
                          f"{list(self.skc.local_block.window)} this trainer builds for the bottleneck "
                          f"{list(self.skc.spatial_size)} (a checkpoint of release 0.2 or older): the local block is "
                          f"rebuilt with the checkpoint's window")
            self.skc.set_local_window(window)

    # -------------------------------------------------------------------------------------------- training helpers
    @property
    def deep_supervision(self) -> bool:
        return self.decoder_u.deep_supervision

    @property
    def decoupled(self) -> bool:
        return self.decoder_u is not self.decoder_l

    def set_deep_supervision(self, enabled: bool) -> None:
        self.decoder_l.deep_supervision = self.decoder_u.deep_supervision = bool(enabled)

    @torch.no_grad()
    def ema_update(self, momentum: float, couple_decoders: bool = True, head_momentum: Optional[float] = None) -> None:
        """The method's EMA, in the reference order (one fused lerp per step):
        1. H_l <- m_h H_l + (1-m_h) H_l_b;  2. D_u <- m D_u + (1-m) D_l (every parameter, heads included);
        3. H_u <- m_h H_u + (1-m_h) H_u_b.
        ``head_momentum`` m_h of steps 1 and 3 defaults to ``momentum`` (the reference: one m for all three);
        1.0 leaves the heads alone. Steps 1 and 3 need balanced heads; step 2 needs two decoders and
        ``couple_decoders`` (False: the no-EMA-coupling ablation)."""
        m_head = momentum if head_momentum is None else head_momentum
        kinds, steps = self._ema_cached(couple_decoders)
        for kind, (targets, sources) in zip(kinds, steps):  # in order: each step reads the previous one's result
            m = m_head if kind == "head" else momentum
            if m != 1.0:
                torch._foreach_lerp_(targets, sources, 1.0 - m)

    def _ema_plan(self, couple_decoders: bool) -> List[Tuple[str, nn.Module, nn.Module]]:
        """(kind, target, source) of ema_update's steps, in the reference order."""
        plan = []
        if self.decoder_l.has_balanced_heads:
            plan.append(("head", self.decoder_l.seg_layers, self.decoder_l.balanced_seg_layers))
        if self.decoupled and couple_decoders:
            plan.append(("decoder", self.decoder_u, self.decoder_l))
        if self.decoupled and self.decoder_u.has_balanced_heads:
            plan.append(("head", self.decoder_u.seg_layers, self.decoder_u.balanced_seg_layers))
        return plan

    def _ema_steps(self, couple_decoders: bool) -> List[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
        """(targets, sources) tensor lists of ema_update's steps. Matching ~100 parameters and buffers by name
        walks the module tree (measured in benchmarks/ema_host_time.py), so the lists are built once and kept:
        parameters stay the same objects while training (optimisers, DDP and load_state_dict update them in
        place); ``_apply`` (``.to()``, ``.cuda()``, ...) and ``load_state_dict`` may replace them and clear the
        cache. The lists hold the tensors themselves (not ``.data`` views), so a deep copy of the network maps
        them onto its own copies."""
        return self._ema_cached(couple_decoders)[1]

    def _ema_cached(self, couple_decoders: bool) -> Tuple[List[str], List[Tuple[List[torch.Tensor], ...]]]:
        """(kinds, steps) of ema_update, built once per flag from ``_ema_plan`` (see ``_ema_steps``)."""
        key = bool(couple_decoders)
        if key not in self._ema_cache:
            plan = self._ema_plan(key)
            self._ema_cache[key] = ([kind for kind, _, _ in plan], [ema_pairs(t, s) for _, t, s in plan])
        return self._ema_cache[key]

    def _apply(self, fn, *args, **kwargs):
        self._ema_cache = {}  # .to() / .cuda() / .half() may put new tensors in place of the cached ones
        return super()._apply(fn, *args, **kwargs)


def _first_mismatch(own: dict, other: dict) -> Optional[str]:
    """A readable description of the first difference between two state dicts (None if keys and shapes
    agree). The class count comes first: it is the usual cause (another dataset's labels)."""
    classes = own.get("class_voxel_counts"), other.get("class_voxel_counts")
    if all(c is not None for c in classes) and classes[0].shape != classes[1].shape:
        return (f"the checkpoint predicts {classes[1].shape[0]} classes (background included), this dataset.json "
                f"has {classes[0].shape[0]}")
    missing, unexpected = sorted(set(own) - set(other)), sorted(set(other) - set(own))
    if missing or unexpected:
        return (f"{len(missing)} network tensors missing from the checkpoint (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for key, value in own.items():
        if tuple(value.shape) != tuple(other[key].shape):
            return f"'{key}' has shape {tuple(other[key].shape)} in the checkpoint, {tuple(value.shape)} here"
    return None


def _split(x: Optional[Outputs], b: int) -> Tuple[Optional[Outputs], Optional[Outputs]]:
    if x is None:
        return None, None
    if isinstance(x, (list, tuple)):
        return [i[:b] for i in x], [i[b:] for i in x]
    return x[:b], x[b:]


def _detach(x: Optional[Outputs]) -> Optional[Outputs]:
    if x is None:
        return None
    return [i.detach() for i in x] if isinstance(x, (list, tuple)) else x.detach()


def ema_pairs(target: nn.Module, source: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Every floating parameter and buffer of ``target`` and its namesake in ``source``: the arguments of one
    fused ``_foreach_lerp_`` (target <- target + w (source - target), no per-tensor Python kernel launches)."""
    t = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    s = {**dict(source.named_parameters()), **dict(source.named_buffers())}
    if t.keys() != s.keys():
        raise RuntimeError("EMA between modules of different structure")
    keys = [k for k in t if t[k].is_floating_point()]
    return [t[k] for k in keys], [s[k] for k in keys]


def bottleneck_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> List[int]:
    """Spatial size of the deepest encoder stage for ``patch_size`` (nnU-Net pads patches to be divisible)."""
    total = np.prod(np.array([np.broadcast_to(s, (len(patch_size),)) for s in strides]), axis=0)
    if any(p % t for p, t in zip(patch_size, total)):
        raise ValueError(f"patch size {list(patch_size)} is not divisible by the total stride {total.tolist()}")
    return [int(p // t) for p, t in zip(patch_size, total)]


def build_skcdf_unet(arch_class_name: str, arch_kwargs: dict, arch_kwargs_req_import: Sequence[str],
                     input_channels: int, num_classes: int, patch_size: Sequence[int], deep_supervision: bool,
                     skc_heads: int = 2, skc_window=None, skc_order: str = "local_global",
                     skc_dropout: float = 0.1, skc_attention_dropout: float = 0.0, skc_enabled: bool = True,
                     balanced_heads: bool = True, decoupled: bool = True,
                     labelled_attention_mode: str = "cross", skc_self_heads: str = "joint") -> SKCDFUNet:
    """SKCDF U-Net from a plans configuration's architecture block (the keyword options after ``skc_dropout``
    select the ablations, see ``SKCDFUNet``)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    def base():
        return get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                      num_classes, allow_init=True, deep_supervision=deep_supervision)

    plans_net = base()
    if not hasattr(plans_net, "encoder") or type(plans_net.decoder).__name__ != "UNetDecoder":
        raise ValueError(f"{arch_class_name}: SKCDF needs an encoder + UNetDecoder network (PlainConvUNet or "
                         f"ResidualEncoderUNet plans)")
    encoder = plans_net.encoder
    decoder_l = DecoderWithBalancedHeads(plans_net.decoder, balanced_heads)
    # D_u: same architecture, its own nnU-Net initialisation
    decoder_u = DecoderWithBalancedHeads(base().decoder, balanced_heads) if decoupled else None
    for decoder in (decoder_l, decoder_u):
        if decoder is not None and decoder.has_balanced_heads:
            decoder.balanced_seg_layers.apply(type(plans_net).initialize)
    skc = PlainBottleneck()
    if skc_enabled:
        skc = SKCModule(encoder.output_channels[-1], bottleneck_size(patch_size, encoder.strides),
                        heads=skc_heads, window=skc_window, dropout=skc_dropout, order=skc_order,
                        attention_dropout=skc_attention_dropout, self_heads=skc_self_heads)
    return SKCDFUNet(encoder, decoder_l, decoder_u, skc, num_classes, labelled_attention_mode)

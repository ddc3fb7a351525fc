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

Settings record: the state dict carries, as ``_extra_state`` (a uint8 tensor holding JSON, so that every entry of
the state dict stays a tensor), the architecture the network was built with (``architecture()``, read from its
modules) and, when a trainer set ``training_record``, the trainer's name and training rules. nnU-Net's predictor
sees only the weights, so this is where ``load_state_dict`` can compare the architecture for prediction and
``--val``; the trainer compares the training rules when it resumes (``--c``).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnunetv2_skcdf.network.building_blocks.skc import SKCModule

Outputs = Union[torch.Tensor, List[torch.Tensor]]
#: the local token learner's weight (P, 1, *window): its kernel is the local window
LOCAL_WINDOW_KEY = "skc.local_block.token_learner.proj.weight"
#: the state-dict key of the settings record (``nn.Module``'s extra state of the top-level module)
RECORD_KEY = "_extra_state"
RECORD_FORMAT = 1
#: architecture settings that change what a trained network computes at inference (the others -- dropouts, the
#: labelled pass's attention mode -- act in training only)
INFERENCE_SETTINGS = ("skc_enabled", "skc_heads", "skc_window", "skc_order", "skc_self_heads", "balanced_heads",
                      "decoupled")
#: the window rule before commit f152b61, stated by behaviour (release 0.1.0, and 0.2.0 until padding landed)
OLD_WINDOW_RULE = ("the divisor rule used before commit f152b61 (release 0.1.0, and 0.2.0 until padded windows "
                   "landed): the largest divisor of the bottleneck <= 2 per axis")


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

    def forward(self, z: torch.Tensor, mode: str = "self", n_labelled: Optional[int] = None,
                cross_group: Optional[int] = None) -> torch.Tensor:
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
        # samples per half in one cross-attention group of the labelled pass (None: the whole other half), a
        # training rule set by the trainer (its skc_cross_group; channel_attention's docstring)
        self.cross_group: Optional[int] = None
        # voxels per class of the labelled training cases (the keep-rates' source), filled once by the trainer;
        # a buffer so that every checkpoint carries it
        self.register_buffer("class_voxel_counts", torch.zeros(num_classes, dtype=torch.long))
        # ema_update's tensor lists per (couple_decoders, buffers) flags, built on first use (see _ema_steps)
        self._ema_cache: Dict[Tuple[bool, bool], Tuple[List[str], List[Tuple[List[torch.Tensor], ...]]]] = {}
        # {"trainer": name, "training": {setting: value}}, set by the trainer: saved with the weights (see the module
        # docstring); the record of the last state dict loaded (None: written before records existed)
        self.training_record: Optional[dict] = None
        self.loaded_record: Optional[dict] = None

    # -------------------------------------------------------------------------------------------- paths
    def forward(self, x: torch.Tensor, x_u: Optional[torch.Tensor] = None,
                x_u_view: Optional[torch.Tensor] = None) -> Union[Outputs, TrainingPass]:
        """``forward(x)``: inference logits of D_u's main head. ``forward(x_l, x_u)``: the training pass.
        ``x_u_view`` (opt-in student view): D_u's unlabelled pass runs on this perturbed copy of ``x_u`` (its own
        encoder pass) while the pseudo labels still come from ``x_u``; without it D_u reuses x_u's features."""
        if x_u is None and x_u_view is not None:
            raise ValueError("x_u_view needs x_u: the student's view belongs to a training pass forward(x_l, x_u, "
                             "x_u_view); inference is forward(x)")
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
        bottleneck = self.skc(skips[-1], mode=self.labelled_attention_mode, n_labelled=b,
                              cross_group=self.cross_group)
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
        """``nn.Module.load_state_dict`` with clear messages. A checkpoint of another dataset, configuration or SKCDF
        variant is refused naming the first difference (PyTorch's own message lists tensor sizes only); one whose
        settings record names an architecture that differs from this network's in a way the shapes do not show
        (self-mode heads, block order, decoupling) is refused naming each difference -- it would predict with
        another network. A checkpoint whose local SKC window differs from this network's (recorded, or, without a
        record, read from the local token learner's kernel; e.g. trained with the divisor rule used before commit
        f152b61) is loaded into a local block rebuilt with that window, so old model folders still predict and
        validate; the trainer refuses to resume training such a network. Silent when the architecture matches.
        A state dict without a record (written before records existed) loads with ``loaded_record = None``."""
        record = decode_record(state_dict.get(RECORD_KEY))
        if record is not None:
            self._refuse_other_architecture(record)
        self._adopt_checkpoint_window(state_dict, record)
        self._ema_cache = {}  # assign=True puts the checkpoint's tensors in place of the cached ones
        mismatch = _first_mismatch(self.state_dict(), state_dict) if strict else None
        if mismatch:
            raise RuntimeError(
                f"this checkpoint does not fit the network built from these plans and dataset.json: {mismatch}. "
                f"The checkpoint was trained on another dataset, configuration or SKCDF variant (-tr). Predict "
                f"with the model folder of the dataset you give to -d (nnUNet_results/DatasetXXX/"
                f"<trainer>__<plans>__<configuration>), or retrain on this dataset.")
        if RECORD_KEY not in state_dict:
            state_dict = _with_entry(state_dict, RECORD_KEY, torch.zeros(0, dtype=torch.uint8))
        result = super().load_state_dict(state_dict, strict, assign)
        self.loaded_record = record
        return result

    def get_extra_state(self) -> torch.Tensor:
        """The settings record saved with the weights (module docstring)."""
        return encode_record({"format": RECORD_FORMAT, "architecture": self.architecture(),
                              **(self.training_record or {})})

    def set_extra_state(self, state) -> None:
        """The record describes what was saved, not this network: ``load_state_dict`` keeps it as ``loaded_record``."""

    def architecture(self) -> dict:
        """The architecture settings as built, read from the modules (the trainer's names; the local window as
        built, per axis): what the settings record stores and what a loaded record is compared with."""
        skc = self.skc if isinstance(self.skc, SKCModule) else None
        attention = skc.local_block.attention if skc is not None else None
        return {"skc_enabled": skc is not None,
                "skc_heads": attention.heads if skc else None,
                "skc_window": list(skc.local_block.window) if skc else None,
                "skc_order": skc.order if skc else None,
                "skc_self_heads": attention.self_heads if skc else None,
                "skc_dropout": attention.proj_dropout.p if skc else None,
                "skc_attention_dropout": attention.attention_dropout if skc else None,
                "labelled_attention_mode": self.labelled_attention_mode if skc else None,
                "balanced_heads": self.decoder_l.has_balanced_heads,
                "decoupled": self.decoupled}

    @property
    def decoders_have_float_buffers(self) -> bool:
        """Whether D_l holds floating buffers (BatchNorm running statistics; nnU-Net's default InstanceNorm plans
        have none): only then does ``ema_update``'s ``buffers`` flag change anything."""
        return any(b.is_floating_point() for b in self.decoder_l.buffers())

    def _refuse_other_architecture(self, record: dict) -> None:
        """Refuse a recorded architecture that differs from this network's in a setting that changes inference
        (the local window is adopted instead: ``_adopt_checkpoint_window``)."""
        own, theirs = self.architecture(), record.get("architecture", {})
        diffs = [f"{k}: {theirs[k]!r} in the checkpoint, {own[k]!r} here" for k in INFERENCE_SETTINGS
                 if k != "skc_window" and k in theirs and theirs[k] != own[k]]
        if diffs:
            raise RuntimeError(
                f"this checkpoint's network was built with another architecture than the trainer class now builds "
                f"({'; '.join(diffs)}). It was trained by {record.get('trainer') or 'an unnamed trainer'}; predict and "
                f"validate it with a trainer that builds the recorded architecture (the release trainers "
                f"SKCDFTrainer_v01 ... _v04 pin theirs: documentation/migration.md, resume matrix).")

    def _adopt_checkpoint_window(self, state_dict, record: Optional[dict] = None) -> None:
        """Rebuild the local SKC block with the checkpoint's window if it differs: the recorded one, else the
        kernel of the checkpoint's local token learner (weight (P, 1, *w))."""
        weight = state_dict.get(LOCAL_WINDOW_KEY)
        if not isinstance(self.skc, SKCModule) or weight is None or weight.ndim != 2 + len(self.skc.spatial_size):
            return
        recorded = (record or {}).get("architecture", {}).get("skc_window")
        window = tuple(recorded) if recorded else tuple(weight.shape[2:])
        if window != self.skc.local_block.window and weight.shape[0] == math.prod(window) \
                and all(w <= s for w, s in zip(window, self.skc.spatial_size)):
            origin = "" if recorded else f" (without a settings record: probably {OLD_WINDOW_RULE})"
            warnings.warn(f"the checkpoint's local SKC window is {list(window)}, not the "
                          f"{list(self.skc.local_block.window)} this trainer builds for the bottleneck "
                          f"{list(self.skc.spatial_size)}{origin}: the local block is rebuilt with the checkpoint's "
                          f"window")
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
    def ema_update(self, momentum: float, couple_decoders: bool = True, head_momentum: Optional[float] = None,
                   buffers: bool = False) -> None:
        """The method's EMA, in the reference order (one fused lerp per step):
        1. H_l <- m_h H_l + (1-m_h) H_l_b;  2. D_u <- m D_u + (1-m) D_l (every parameter, heads included);
        3. H_u <- m_h H_u + (1-m_h) H_u_b.
        ``head_momentum`` m_h of steps 1 and 3 defaults to ``momentum`` (the reference: one m for all three);
        1.0 leaves the heads alone. Steps 1 and 3 need balanced heads; step 2 needs two decoders and
        ``couple_decoders`` (False: the no-EMA-coupling ablation). Parameters only, as the reference;
        ``buffers=True`` also averages floating buffers (BatchNorm running statistics), the rule up to 0.4."""
        m_head = momentum if head_momentum is None else head_momentum
        kinds, steps = self._ema_cached(couple_decoders, buffers)
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

    def _ema_steps(self, couple_decoders: bool, buffers: bool = False) -> List[Tuple[List[torch.Tensor], ...]]:
        """(targets, sources) tensor lists of ema_update's steps, as cached. Not used by training itself: it is
        the handle through which ``benchmarks/diagnostics/ema_host_time.py`` times the cached lists and the tests
        check them."""
        return self._ema_cached(couple_decoders, buffers)[1]

    def _ema_cached(self, couple_decoders: bool, buffers: bool = False) \
            -> Tuple[List[str], List[Tuple[List[torch.Tensor], ...]]]:
        """(kinds, steps) of ema_update, built once per flags from ``_ema_plan``. Matching ~100 parameters by name
        walks the module tree (measured in benchmarks/diagnostics/ema_host_time.py), so the lists are kept:
        parameters stay the same objects while training (optimisers, DDP and load_state_dict update them in
        place); ``_apply`` (``.to()``, ``.cuda()``, ...) and ``load_state_dict`` may replace them and clear the
        cache. The lists hold the tensors themselves (not ``.data`` views), so a deep copy of the network maps
        them onto its own copies."""
        key = (bool(couple_decoders), bool(buffers))
        if key not in self._ema_cache:
            plan = self._ema_plan(key[0])
            self._ema_cache[key] = ([kind for kind, _, _ in plan], [ema_pairs(t, s, key[1]) for _, t, s in plan])
        return self._ema_cache[key]

    def _apply(self, fn, *args, **kwargs):
        self._ema_cache = {}  # .to() / .cuda() / .half() may put new tensors in place of the cached ones
        return super()._apply(fn, *args, **kwargs)


def _first_mismatch(own: dict, other: dict) -> Optional[str]:
    """A readable description of the first difference between two state dicts (None if keys and shapes
    agree). The class count comes first: it is the usual cause (another dataset's labels). The settings record
    is no network tensor (it may be absent, and its length varies): ``load_state_dict`` compares it itself."""
    own, other = ({k: v for k, v in d.items() if k != RECORD_KEY} for d in (own, other))
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


def ema_pairs(target: nn.Module, source: nn.Module, buffers: bool = False) \
        -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Every floating parameter of ``target`` and its namesake in ``source`` (``buffers=True``: floating buffers
    too): the arguments of one fused ``_foreach_lerp_`` (target <- target + w (source - target), no per-tensor
    Python kernel launches)."""
    def tensors(module: nn.Module) -> dict:
        return {**dict(module.named_parameters()), **(dict(module.named_buffers()) if buffers else {})}

    t, s = tensors(target), tensors(source)
    if t.keys() != s.keys():
        raise RuntimeError("EMA between modules of different structure")
    keys = [k for k in t if t[k].is_floating_point()]
    return [t[k] for k in keys], [s[k] for k in keys]


def encode_record(record: dict) -> torch.Tensor:
    """A JSON-able dict as a uint8 tensor (a state-dict entry every tool that handles tensors can copy)."""
    return torch.tensor(list(json.dumps(record, sort_keys=True).encode()), dtype=torch.uint8)


def decode_record(value) -> Optional[dict]:
    """The dict ``encode_record`` stored; None for a missing or empty entry (a checkpoint without a record)."""
    if value is None or not torch.is_tensor(value) or value.numel() == 0:
        return None
    return json.loads(bytes(value.detach().cpu().to(torch.uint8).tolist()).decode())


def _with_entry(state_dict, key: str, value):
    """A shallow copy of a state dict with one more entry, keeping its ``_metadata`` (module versions)."""
    copied = OrderedDict(state_dict)
    copied[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        copied._metadata = metadata
    return copied


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

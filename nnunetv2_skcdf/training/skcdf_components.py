"""The method's small parts, as functions the trainer composes: class keep-rates, balanced masks,
pseudo labels, masked targets for nnU-Net's losses, the consistency ramp-up.

Shapes: targets and pseudo labels are nnU-Net's (B, 1, *S) integer maps, logits (B, C, *S); a deep-supervision
list holds one such tensor per scale, full resolution first. Rates are (C,) float tensors on the device.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

Scales = Union[torch.Tensor, List[torch.Tensor]]


# ------------------------------------------------------------------------------------------ keep-rates
def count_class_voxels(label_arrays, num_classes: int) -> np.ndarray:
    """Voxels per class over an iterable of label arrays (negative values = outside the crop, ignored)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for seg in label_arrays:
        values = np.asarray(seg).ravel()
        values = values[(values >= 0) & (values < num_classes)]
        counts += np.bincount(values.astype(np.int64), minlength=num_classes)
    return counts


def keep_rates_from_counts(counts: Sequence[int]) -> torch.Tensor:
    """``r_c = min_k n_k / n_c`` over the classes present (the rarest present class keeps everything: 1.0).

    A class absent from the labelled cases gets 1.0: it never occurs in a label, and if the network predicts it
    in a pseudo label there is no count to balance it against, so it is not thinned out.
    """
    counts = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    present = counts > 0
    if not present.any():
        raise ValueError("no labelled voxel at all: cannot compute class keep-rates")
    rarest = counts[present].min()
    return torch.where(present, rarest / counts.clamp(min=1), torch.ones_like(counts)).float()


def annealed_keep_rates(rates: torch.Tensor, epoch: int, num_epochs: int) -> torch.Tensor:
    """``r'_c(t) = 1 - (t/T)(1 - r_c)``: 1 for every class at t = 0, ``r_c`` at t = T."""
    progress = min(max(epoch / max(num_epochs, 1), 0.0), 1.0)
    return 1.0 - progress * (1.0 - rates)


def consistency_weight(epoch: int, rampup_epochs: int, weight: float) -> float:
    """``lambda(t) = w exp(-5 (1 - t/T_ramp)^2)`` (sigmoid ramp-up of Laine & Aila), ``w`` after the ramp."""
    if rampup_epochs <= 0:
        return float(weight)
    progress = min(max(epoch / rampup_epochs, 0.0), 1.0)
    return float(weight * math.exp(-5.0 * (1.0 - progress) ** 2))


# ------------------------------------------------------------------------------------------ masks and targets
def balanced_mask(target: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Bernoulli(rates[target]) per voxel, drawn on the target's device. target (B, 1, *S) -> bool (B, 1, *S).
    Voxels outside [0, C) (ignore label) are never kept."""
    valid = (target >= 0) & (target < rates.numel())
    probs = rates.to(target.device)[target.long().clamp(0, rates.numel() - 1)]
    return (torch.rand(target.shape, device=target.device) < probs) & valid


def masked_target(target: torch.Tensor, keep: torch.Tensor, ignore_value: int) -> torch.Tensor:
    """Target with dropped voxels set to ``ignore_value``, which nnU-Net's DC+CE loss excludes from CE and Dice."""
    return torch.where(keep, target, torch.full_like(target, ignore_value))


def set_ignore_value(loss, ignore_value: int):
    """Make nnU-Net's DC_and_CE_loss (optionally in a DeepSupervisionWrapper) skip ``ignore_value`` voxels in CE
    and Dice -- the mechanism nnU-Net uses for its ignore label -- and return it."""
    inner = getattr(loss, "loss", loss)
    inner.ignore_label = inner.ce.ignore_index = ignore_value
    return loss


def pseudo_labels(logits: Optional[Scales]) -> Optional[Scales]:
    """argmax over classes per scale, as (B, 1, *S) int16 maps like nnU-Net's targets, without gradient.
    (``max(1)`` rather than ``argmax(1)``: the same indices, 3x faster over the channel axis on CPU.)"""
    if logits is None:  # no balanced heads (ablation)
        return None
    if isinstance(logits, (list, tuple)):
        return [pseudo_labels(x) for x in logits]
    with torch.no_grad():
        return logits.max(1, keepdim=True)[1].to(torch.int16)


def multiply_mask(logits: Scales, target: Scales, keep: Scales):
    """The reference implementation's masking: logits and labels multiplied by the mask, which turns dropped
    voxels into zero logits with a 'background' target. They get no gradient but still count in the CE mean and
    the Dice sums, so the kept voxels' gradients are diluted. ``SKCDFTrainer``'s default since 0.4.0 (measured:
    BENCHMARKS_FINDINGS.md, items 14-15); :func:`masked_target` is the full-strength alternative."""
    if isinstance(logits, (list, tuple)):
        pairs = [multiply_mask(lg, t, k) for lg, t, k in zip(logits, target, keep)]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return logits * keep.to(logits.dtype), target * keep.to(target.dtype)


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxel count per class of a label map (any shape), on its device (no host sync)."""
    return torch.bincount(labels.reshape(-1).long().clamp(0, num_classes - 1), minlength=num_classes)


# ---------------------------------------------------------------------------------------------- student's view
def strong_intensity_transform(ignore_axes=None):
    """The student's perturbed view of an unlabelled patch (opt-in, ``SKCDFTrainer.unlabelled_view``): nnU-Net's
    own intensity transforms of ``nnUNetTrainer.get_training_transforms``, with the same ranges, each applied
    with a high probability instead of 0.1-0.3. Intensity only: the geometry, hence the alignment of the patch
    with the pseudo labels made from the unperturbed view, is unchanged. Works on a (C, *S) tensor on any
    device: ``transform(image=x)["image"]``."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    return ComposeTransforms([
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=0.5),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5), apply_probability=0.5),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.8),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=0.8),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=ignore_axes,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.5),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.8),
    ])


def perturbed_view(x: torch.Tensor, transform) -> torch.Tensor:
    """A perturbed copy of a batch (B, C, *S), ``transform`` applied to each sample; ``x`` is left unchanged."""
    with torch.no_grad():
        return torch.stack([transform(image=s.clone())["image"] for s in x]).to(x.dtype)


# ------------------------------------------------------------------------------------------ appearance transfer
def case_quantiles(image, levels: int = 256, max_voxels: int = 1 << 18,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A whole case's intensity table for appearance transfer: (C, 1 + ``levels``) float32, per channel the image's
    minimum, then the quantiles at ``levels`` evenly spaced points of the voxels above that minimum (estimated from
    at most ``max_voxels`` of them, drawn at random). nnU-Net's CT normalisation clips air to one value, the
    minimum: left out, it would make the table describe how much air a case has rather than its tissues' contrast
    (and the minimum itself maps to the other case's minimum). An image with no voxel above its minimum keeps all
    of them."""
    x = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    t = torch.linspace(0, 1, levels)
    rows = []
    for c in range(x.shape[0]):
        values = x[c].reshape(-1)
        floor = values.min()
        body = values[values > floor]
        if body.numel() == 0:
            body = values
        rows.append(torch.cat([floor[None], torch.quantile(_voxel_sample(body, max_voxels, generator), t)]))
    return torch.stack(rows)


def match_quantiles(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``x`` (C, *S) with each channel mapped by the monotone piecewise-linear map that sends the intensity table
    ``source`` (C, K) onto ``target`` (C, K) (:func:`case_quantiles` of two cases): a voxel at quantile t of the
    source case gets the target case's quantile t. A run of equal source entries maps to the middle of its range
    (not to one end); values beyond the source's ends map to the target's ends. Returns a new tensor of x's dtype;
    no gradient (an input transform)."""
    if not (x.shape[0] == source.shape[0] == target.shape[0]) or source.shape != target.shape:
        raise ValueError(f"match_quantiles: {x.shape[0]} channels, tables {tuple(source.shape)} and "
                         f"{tuple(target.shape)}")
    with torch.no_grad():
        out = torch.empty_like(x)
        n = source.shape[1]
        for c in range(x.shape[0]):
            values = x[c].reshape(-1).float()
            qx, qr = source[c].to(x.device, torch.float32), target[c].to(x.device, torch.float32)
            # knots of the map: each distinct source entry at the middle of its run of equal entries
            knots, counts = torch.unique_consecutive(qx, return_counts=True)
            first = torch.cumsum(counts, 0) - counts
            position = first.float() + (counts.float() - 1) / 2
            i0 = position.floor().long().clamp(max=n - 2)
            targets = torch.lerp(qr[i0], qr[i0 + 1], position - i0.float())
            if knots.numel() == 1:  # a constant source: one value, the target's middle entry
                out[c] = targets[0].to(x.dtype)
                continue
            # the map tabulated on a uniform grid over the knots' range, then read per voxel by elementwise ops
            # (a per-voxel search among the knots costs several times more on a CPU)
            grid = torch.linspace(float(knots[0]), float(knots[-1]), _TABLE, device=x.device)
            table = _piecewise_linear(grid, knots, targets)
            scaled = ((values - knots[0]) * ((_TABLE - 1) / (knots[-1] - knots[0]))).clamp(0, _TABLE - 1)
            j = scaled.floor().clamp(max=_TABLE - 2)
            out[c] = torch.lerp(table[j.long()], table[j.long() + 1], scaled - j).reshape(x.shape[1:]).to(x.dtype)
        return out


#: grid points of match_quantiles' tabulated map: 4096 over the source table's range (at most 257 knots)
_TABLE = 4096


def _piecewise_linear(v: torch.Tensor, knots: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The linear interpolation of (knots, targets) at ``v`` (knots increasing), constant beyond the ends."""
    i = (torch.searchsorted(knots, v, right=True) - 1).clamp(0, knots.numel() - 2)
    w = ((v - knots[i]) / (knots[i + 1] - knots[i])).clamp(0, 1)
    return torch.lerp(targets[i], targets[i + 1], w)


def _voxel_sample(values: torch.Tensor, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    if values.numel() <= n:
        return values
    index = torch.randint(values.numel(), (n,), device=values.device, generator=generator)
    return values[index]


def appearance_transfer(x_l: torch.Tensor, x_u: torch.Tensor, probability: float,
                        table_l: Callable[[int], torch.Tensor], table_u: Callable[[int], torch.Tensor],
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The labelled batch (B, C, *S) with each sample ``i``, with ``probability``, mapped (:func:`match_quantiles`)
    from its case's intensity table ``table_l(i)`` onto that of the case of one sample ``j`` of the unlabelled batch
    ``x_u`` drawn at random, ``table_u(j)``: the labels stay valid (a monotone intensity map moves no voxel) while
    the labelled image takes on the intensity distribution of an unlabelled case, e.g. another site's contrast
    phase. Whole cases, not patches: two random patches differ in how much air and which organs they hold, and
    matching those would move tissue to air. Tables are asked for the matched samples only. ``x_l`` is left
    unchanged."""
    if probability <= 0:
        return x_l
    draw = torch.rand(x_l.shape[0], generator=generator)
    pick = torch.randint(x_u.shape[0], (x_l.shape[0],), generator=generator)
    out = x_l.clone()
    for i in range(x_l.shape[0]):
        if draw[i] < probability:
            out[i] = match_quantiles(x_l[i], table_l(i), table_u(int(pick[i])))
    return out


# ---------------------------------------------------------------------------------------------- copy-paste
Box = Optional[tuple]  # ((start, stop) per spatial axis) at full resolution, or None: nothing pasted


def paste_boxes(batch: int, spatial: Sequence[int], probability: float, size: float,
                generator: Optional[torch.Generator] = None) -> List[Box]:
    """Per unlabelled sample: with ``probability`` a box of ``round(size * S_d)`` voxels (at least 1) along each
    spatial axis ``d``, at a uniformly random position inside the patch; otherwise None. No random number is drawn
    at probability 0 (the trainer's other draws stay the reference's)."""
    if probability <= 0:
        return [None] * batch
    draw = torch.rand(batch, generator=generator)
    boxes = []
    for i in range(batch):
        if draw[i] >= probability:
            boxes.append(None)
            continue
        box = []
        for s in spatial:
            edge = min(max(1, round(size * s)), s)
            start = int(torch.randint(s - edge + 1, (1,), generator=generator))
            box.append((start, start + edge))
        boxes.append(tuple(box))
    return boxes


def box_mask(box: tuple, full: Sequence[int], shape: Sequence[int], device=None) -> torch.Tensor:
    """The voxels of a ``shape`` grid whose full-resolution source voxel lies in ``box`` (a box of the ``full``
    grid): nnU-Net's deep-supervision targets are the full-resolution target downsampled with
    ``interpolate(mode="nearest-exact")`` (batchgeneratorsv2's ``DownsampleSegForDSTransform``), so the same
    mapping tells which voxels of a coarser target come from the pasted region. -> bool (*shape)."""
    mask = torch.zeros(tuple(full), dtype=torch.float32, device=device)
    mask[tuple(slice(a, b) for a, b in box)] = 1
    if tuple(shape) != tuple(full):
        mask = torch.nn.functional.interpolate(mask[None, None], tuple(shape), mode="nearest-exact")[0, 0]
    return mask > 0.5


def copy_paste(x_u: torch.Tensor, x_l: torch.Tensor, boxes: List[Box]) -> torch.Tensor:
    """Unlabelled batch (B_u, C, *S) with, for each sample ``j`` that has a box, the box's voxels taken from labelled
    sample ``j mod B_l`` (the same position in both patches): labelled anatomy inside an unlabelled image, as
    bidirectional copy-paste (Bai et al., CVPR 2023) does in its labelled-into-unlabelled direction. ``x_u`` is
    left unchanged; without any box it is returned as is."""
    if all(b is None for b in boxes):
        return x_u
    out = x_u.clone()
    for j, box in enumerate(boxes):
        if box is not None:
            region = (slice(None),) + tuple(slice(a, b) for a, b in box)
            out[j][region] = x_l[j % x_l.shape[0]][region].to(out.dtype)
    return out


def outside_boxes(labels: torch.Tensor, boxes: List[Box]) -> torch.Tensor:
    """The voxels of a full-resolution label map (B, 1, *S) outside each sample's pasted box, flattened (all of
    them without boxes): what a statistic of the unlabelled images' own pseudo labels may count."""
    if all(b is None for b in boxes):
        return labels
    keep = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    for j, box in enumerate(boxes):
        if box is not None:
            keep[j][(slice(None),) + tuple(slice(a, b) for a, b in box)] = False
    return labels[keep]


def paste_targets(target_u: Optional[Scales], target_l: Scales, boxes: List[Box],
                  full: Sequence[int]) -> Optional[Scales]:
    """The unlabelled targets (pseudo labels, (B_u, 1, *S) per scale) with each box's voxels set to the label of
    the labelled sample pasted there (``target_l``, the same scales): inside a pasted box the unlabelled decoder
    learns the true label. ``full`` is the full-resolution patch size the boxes refer to."""
    if target_u is None or all(b is None for b in boxes):
        return target_u
    if isinstance(target_u, (list, tuple)):
        return [paste_targets(u, t, boxes, full) for u, t in zip(target_u, target_l)]
    out = target_u.clone()
    for j, box in enumerate(boxes):
        if box is not None:
            mask = box_mask(box, full, out.shape[2:], out.device)[None]
            out[j] = torch.where(mask, target_l[j % target_l.shape[0]].to(out.dtype), out[j])
    return out


# ---------------------------------------------------------------------------------------------- confidence filter
def confident(logits: Optional[Scales], threshold: float) -> Optional[Scales]:
    """Per scale, (B, 1, *S) bool: the voxels whose softmax maximum over classes is at least ``threshold`` (the
    pseudo labels a FixMatch-style filter keeps); None at threshold 0 (no filter) or without logits."""
    if logits is None or threshold <= 0:
        return None
    if isinstance(logits, (list, tuple)):
        return [confident(x, threshold) for x in logits]
    with torch.no_grad():
        return torch.softmax(logits.float(), 1).amax(1, keepdim=True) >= threshold

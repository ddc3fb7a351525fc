"""SKCDF's settings: what a checkpoint records, what each former release trained with, and how the settings of a
checkpoint written before the record existed are inferred.

Settings are the trainer's class attributes (architecture: ``build_network_architecture`` is a classmethod) and
its hyperparameter block (training rules). They are compared as *effective* values for one network: the local
window resolved for the bottleneck (a rule name like ``"divisor"`` and the window it gives are the same setting
where they agree), and a setting that cannot act on this network (masking without balanced heads, the buffer EMA
without floating buffers, ...) set to None, so that only differences that change training are reported.

The release table is the history of ``SKCDFTrainer``'s defaults (``git log -p -- nnunetv2_skcdf/training``;
documentation/migration.md, resume matrix). Every default set the trainer ever shipped has a trainer that pins all
of it (``variants/releases/SKCDFTrainer_releases.py``).
"""
from __future__ import annotations

import ast
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nnunetv2_skcdf.network.building_blocks.skc import resolve_window

#: class attributes of SKCDFTrainer (the network it builds)
ARCHITECTURE_SETTINGS = ("skc_enabled", "skc_heads", "skc_window", "skc_order", "skc_self_heads", "skc_dropout",
                         "skc_attention_dropout", "labelled_attention_mode", "balanced_heads", "decoupled")
#: the hyperparameter block of SKCDFTrainer.__init__ (``max_nonfinite_steps`` is a safety stop, not a rule)
TRAINING_SETTINGS = ("masking", "head_ema", "ema_momentum", "ema_couple_decoders", "ema_buffers",
                     "consistency_weight", "rampup_epochs", "unlabeled_batch_size", "unlabelled_view",
                     "keep_rate_source", "skc_cross_group", "appearance_transfer", "copy_paste", "copy_paste_size",
                     "pseudo_label_threshold")
SETTINGS = ARCHITECTURE_SETTINGS + TRAINING_SETTINGS
#: architecture settings the weights' shapes reveal (a checkpoint without a record still tells them)
SHAPE_SETTINGS = ("skc_enabled", "skc_heads", "skc_window", "balanced_heads")
#: settings of the SKC module (None without it)
_SKC_ONLY = ("skc_heads", "skc_window", "skc_order", "skc_self_heads", "skc_dropout", "skc_attention_dropout",
             "labelled_attention_mode")

_V04 = dict(skc_enabled=True, skc_heads=2, skc_window=None, skc_order="local_global", skc_self_heads="joint",
            skc_dropout=0.1, skc_attention_dropout=0.0, labelled_attention_mode="cross", balanced_heads=True,
            decoupled=True, masking="multiply", head_ema="lr_scaled", ema_momentum=0.99, ema_couple_decoders=True,
            ema_buffers=True, consistency_weight=10.0, rampup_epochs=None, unlabeled_batch_size=None,
            unlabelled_view="same", keep_rate_source="labelled_cases", skc_cross_group=None, appearance_transfer=0.0,
            copy_paste=0.0, copy_paste_size=2 / 3, pseudo_label_threshold=0.0)
_V03 = {**_V04, "masking": "exclude"}
_V02 = {**_V03, "head_ema": "constant"}
_V01 = {**_V02, "skc_window": "divisor"}

#: one trainer per former default set, newest first: {name: {"settings", "release" (short), "written_by"}}
RELEASE_TRAINERS: Dict[str, dict] = {
    "SKCDFTrainer_v04": {
        "settings": _V04, "release": "0.4.0",
        "written_by": "release 0.4.0 (commit 2c665df up to the settings record): multiplied masking, lr-scaled head "
                      "EMA, padded windows; the decoder EMA also averaged floating buffers"},
    "SKCDFTrainer_v03": {
        "settings": _V03, "release": "0.3.0",
        "written_by": "release 0.3.0 (commits 672d243 up to 2c665df): exclude masking, lr-scaled head EMA, padded "
                      "windows"},
    "SKCDFTrainer_v02": {
        "settings": _V02, "release": "0.2.0 with padded windows",
        "written_by": "release 0.2.0 from commit f152b61 (padded windows) up to 672d243: exclude masking, constant "
                      "head EMA"},
    "SKCDFTrainer_v01": {
        "settings": _V01, "release": "0.1.0",
        "written_by": "release 0.1.0 from commit 15e93fc, and 0.2.0 up to f152b61 (the rename; same rules): "
                      "divisor windows, constant head EMA, exclude masking"},
    "SKCDFTrainer_v01attnDropout": {
        "settings": {**_V01, "skc_attention_dropout": 0.1}, "release": "0.1.0 before 15e93fc",
        "written_by": "release 0.1.0 from commit 0b7890b up to 15e93fc (its first day): 0.1's rules with dropout 0.1 "
                      "on the attention weights"},
}
#: SKCDFTrainer's own defaults (tested against the trainer): 0.4's, the decoder EMA on parameters only, cross
#: attention in groups of 2 samples per half (acts only on batches of more than 2 per half: 2D plans)
CURRENT_DEFAULTS = {**_V04, "ema_buffers": False, "skc_cross_group": 2}
#: the reference code's settings (github.com/yinguanchun/SKCDF) wherever the integration has a switch: constant head
#: EMA step, per-head self mode, cross-attention over every unlabelled sample of the batch, parameters-only EMA,
#: multiplied masking, window 2 per axis, 2 heads, output dropout 0.1, dropout 0.1 on the attention weights, w = 10
#: ramped over the whole budget, m = 0.99.
#: Pinned (not derived from today's defaults): "the paper" stays what it is whatever the defaults become
REFERENCE_SETTINGS = {**_V04, "head_ema": "constant", "skc_self_heads": "per_head", "ema_buffers": False,
                      "skc_attention_dropout": 0.1}
#: trainers that pin a rule set which was no release's defaults, each with its description: the reference's
#: settings, and rule sets main trained with between two releases (today's defaults but for what changed after),
#: so that a run started with them resumes with their trainer where no release trainer has its rules
NAMED_RULE_SETS: Dict[str, dict] = {
    "SKCDFTrainer_reference": {
        "settings": REFERENCE_SETTINGS,
        "written_by": "the reference code's settings: constant head EMA step, per-head self mode, cross-attention "
                      "over the whole other half, multiplied masking, dropout 0.1 on the attention weights"},
    "SKCDFTrainer_crossWholeBatch": {
        "settings": {**CURRENT_DEFAULTS, "skc_cross_group": None},
        "written_by": "main between the settings record (19f04fa) and cross-attention groups (3dd3d75): today's "
                      "rules with the cross-attention over the whole other half"},
}
#: every trainer with a pinned or default rule set, in the order the refusals propose them: the releases (newest
#: first), SKCDFTrainer (today's defaults), the named ones
_ALL_RULE_SETS: Dict[str, dict] = {**RELEASE_TRAINERS,
                                   "SKCDFTrainer": {"settings": CURRENT_DEFAULTS, "written_by": "today's defaults"},
                                   **NAMED_RULE_SETS}


def written_by(name: str) -> str:
    """What wrote runs with the rules of trainer ``name`` (a release, today's defaults, a named rule set)."""
    return _ALL_RULE_SETS[name]["written_by"]


#: the value a setting had in the releases before it existed (reading an old debug.json); skc_attention_dropout,
#: absent before 15e93fc, equalled skc_dropout then (one dropout on both)
BEFORE_IT_EXISTED = {"head_ema": "constant", "skc_self_heads": "joint", "ema_couple_decoders": True,
                     "unlabelled_view": "same", "skc_enabled": True, "labelled_attention_mode": "cross",
                     "balanced_heads": True, "decoupled": True, "ema_buffers": True,
                     "keep_rate_source": "labelled_cases", "skc_cross_group": None, "appearance_transfer": 0.0,
                     "copy_paste": 0.0, "copy_paste_size": None, "pseudo_label_threshold": 0.0}


def raw_settings(obj) -> dict:
    """The settings of a trainer instance or class (class attributes; the hyperparameter block needs an instance)."""
    return {k: getattr(obj, k) for k in SETTINGS}


def effective(raw: dict, bottleneck: Optional[Sequence[int]], float_buffers: bool,
              batch: Optional[Tuple[int, int]] = None) -> dict:
    """The settings as they act on one network: ``bottleneck`` its SKC module's spatial size (None without SKC),
    ``float_buffers`` whether its decoders hold floating buffers, ``batch`` the (labelled, unlabelled) batch
    sizes it trains with (None: unknown, the cross-attention group is kept as given; see the module
    docstring). A cross-attention group acts only in cross mode and when it is smaller than both halves."""
    s = dict(raw)
    group = s.get("skc_cross_group")
    if not (s["skc_enabled"] and bottleneck is not None and s["labelled_attention_mode"] == "cross") or (
            group is not None and batch is not None and group >= min(batch)):
        s["skc_cross_group"] = None
    if s["skc_enabled"] and bottleneck is not None:
        s["skc_window"] = list(resolve_window(bottleneck, s["skc_window"]))
        s["skc_dropout"], s["skc_attention_dropout"] = float(s["skc_dropout"]), float(s["skc_attention_dropout"])
    else:
        s.update(dict.fromkeys(_SKC_ONLY))
    if not s["balanced_heads"]:
        s["masking"] = s["head_ema"] = None
    if not s["decoupled"]:
        s["ema_couple_decoders"] = None
    if not s["copy_paste"]:  # the box size acts only where boxes are pasted
        s["copy_paste_size"] = None
    if not (s["decoupled"] and s["ema_couple_decoders"] and float_buffers):
        s["ema_buffers"] = None
    return s


def differences(checkpoint: dict, own: dict) -> List[Tuple[str, Any, Any]]:
    """(setting, checkpoint's value, own value) where they differ, in ``SETTINGS`` order."""
    return [(k, checkpoint.get(k), own.get(k)) for k in SETTINGS if checkpoint.get(k) != own.get(k)]


def release_candidates(settings: dict, bottleneck, float_buffers: bool, keys: Sequence[str] = SETTINGS,
                       batch: Optional[Tuple[int, int]] = None) -> List[str]:
    """The release trainers (newest first), then ``SKCDFTrainer`` (today's defaults), then the interim ones
    (:data:`NAMED_RULE_SETS`), whose effective settings equal ``settings`` on ``keys`` for this network
    (``batch``: as in ``effective``)."""
    tables = {name: entry["settings"] for name, entry in _ALL_RULE_SETS.items()}
    return [name for name, table in tables.items()
            if all(effective(table, bottleneck, float_buffers, batch)[k] == settings.get(k) for k in keys)]


def closest_release(settings: dict, bottleneck, float_buffers: bool,
                    batch: Optional[Tuple[int, int]] = None) -> Tuple[str, List[Tuple[str, Any, Any]]]:
    """The release trainer with the fewest differences to ``settings`` (newest first on ties), and those."""
    scored = [(name, differences(settings, effective(entry["settings"], bottleneck, float_buffers, batch)))
              for name, entry in RELEASE_TRAINERS.items()]
    return min(scored, key=lambda item: len(item[1]))


def settings_from_debug_json(path: str) -> Optional[dict]:
    """The raw settings nnU-Net's ``debug.json`` recorded (``str()`` of every trainer attribute, written when a
    training session starts), with the value of the time for settings that did not exist yet; None when the file
    holds no SKCDF trainer's attributes."""
    with open(path) as f:
        debug = json.load(f)
    if "masking" not in debug:
        return None
    raw = {}
    for key in SETTINGS:
        if key in debug:
            raw[key] = _literal(debug[key])
        elif key == "skc_attention_dropout":
            raw[key] = _literal(debug.get("skc_dropout", "0.1"))
        else:
            raw[key] = BEFORE_IT_EXISTED.get(key)
    return raw


def debug_json_predates(path: str, epoch_end_timestamps: Sequence[float]) -> bool:
    """Whether ``path`` was written before the checkpoint's last epoch ended: then the session it describes (the
    last one to start) trained that epoch. Copying a folder makes files newer, never older: a copy reads as 'after'
    (not trusted), never the reverse."""
    return bool(epoch_end_timestamps) and os.path.getmtime(path) <= float(epoch_end_timestamps[-1])


def _literal(value):
    """A debug.json value (``str()`` of the attribute) back to Python: '0.99' -> 0.99, 'None' -> None,
    '(1, 2, 2)' -> (1, 2, 2), 'exclude' -> 'exclude'."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value

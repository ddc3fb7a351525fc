"""``skcdf_split``: write one ``splits_final.json`` that drives both SKCDF and the labelled-only baseline.

Each fold is ``{"train": [labelled ids], "val": [ids], "unlabeled": [ids]}``. nnU-Net's
``nnUNetTrainer.do_split`` reads ``train``/``val`` and ignores ``unlabeled``, so
``nnUNetv2_train D CONFIG FOLD -tr nnUNetTrainer`` on the same file is the fair labelled-only baseline.
Unlabelled ids are training cases whose labels are hidden, or cases of ``imagesUnlabeled/``.

Layers (so the logic can be tested without files):

* ``compute_semi_supervised_splits`` -- pure: id lists + options -> folds and notes;
* ``validate_splits`` -- pure checks on any split list (also used by the trainer);
* ``make_semi_supervised_splits`` -- reads ``nnUNet_raw``, writes ``nnUNet_preprocessed``;
* ``split_entry`` -- the ``skcdf_split`` console script.
"""
from __future__ import annotations

import argparse
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from nnunetv2_skcdf.splits.published_lists import (
    IdMapper,
    PublishedLists,
    format_ids,
    read_published_lists,
)
from nnunetv2_skcdf.utilities.dataset_files import (
    UNLABELED_IMAGES_FOLDER,
    SKCDFInputError,
    dataset_name,
    exit_on_input_error,
    list_unlabeled_cases,
    load_dataset_json,
    plain,
    preprocessed_dataset_folder,
    raw_dataset_folder,
    training_case_ids,
)
from nnunetv2_skcdf.utilities.io import atomic_save_json, read_json

SPLITS_FILE = "splits_final.json"
DEFAULT_SEED = 12345
DEFAULT_VAL = 0.2
FOLD_MODES = ("repeat", "resample")
#: Role names used in options and messages; ``labeled`` is stored under nnU-Net's key ``train``.
ROLES = ("labeled", "unlabeled", "val")
ROLE_KEYS = {"labeled": "train", "unlabeled": "unlabeled", "val": "val"}

Amount = Union[int, float, str]
Fold = Dict[str, List[str]]
MAKE_ONE_HINT = ("Make a semi-supervised split with skcdf_split, e.g.\n"
                 "  skcdf_split -d DATASET --labeled 0.2 --overwrite\n(see skcdf_split --help).")


# --------------------------------------------------------------------------------------------------
# amounts: fractions, counts, 'all'
# --------------------------------------------------------------------------------------------------
def parse_amount(value: Amount, option: str, allow_all: bool = False) -> Union[int, float, str]:
    """Normalize ``--labeled``/``--val``: a fraction in (0, 1), an integer count >= 1, or ``'all'``.

    Strings are parsed (``'0.2'``, ``'5'``, ``'all'``). Anything else raises ``SKCDFInputError``.
    """
    forms = "a fraction 0 < X < 1 (e.g. 0.2), an integer count >= 1 (e.g. 8)" + (" or 'all'" if allow_all else "")
    if isinstance(value, str):
        text = value.strip().lower()
        if allow_all and text == "all":
            return "all"
        try:
            value = int(text) if text.lstrip("+").isdigit() else float(text)
        except ValueError:
            raise SKCDFInputError(f"{option} {value!r} is not valid: give {forms}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SKCDFInputError(f"{option} {value!r} is not valid: give {forms}.")
    if isinstance(value, int):
        if value < 1:
            raise SKCDFInputError(f"{option} {value} is not valid: a count must be >= 1; give {forms}.")
        return value
    if not 0 < value < 1:
        raise SKCDFInputError(f"{option} {value} is not valid: a fraction must be strictly between 0 and 1; "
                              f"give {forms}.")
    return value


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even (2.5 -> 2); users expect 0.5 of 5 cases to give 3.
    return int(math.floor(x + 0.5 + 1e-9))


def _seeded_sample(ids: Sequence[str], k: int, seed_text: str) -> List[str]:
    # str seeds are hashed with SHA-512 by random.Random, so draws are identical across processes and
    # Python versions, unlike hash()-based or numpy-version-dependent generators.
    return sorted(random.Random(seed_text).sample(sorted(ids), k))


# --------------------------------------------------------------------------------------------------
# mode (a): random labelled subset + validation cases
# --------------------------------------------------------------------------------------------------
def _check_training_ids(ids: Iterable[str], option: str, training: Set[str], unlabeled_images: Set[str]) -> None:
    """Ids that need a label (labelled, val) must be training cases."""
    no_label = sorted(i for i in ids if i not in training and i in unlabeled_images)
    unknown = sorted(i for i in ids if i not in training and i not in unlabeled_images)
    if unknown:
        raise SKCDFInputError(
            f"{option}: unknown case id(s) {format_ids(unknown)}: neither a training case (imagesTr) nor an "
            f"imagesUnlabeled case. Use ids as in imagesTr, e.g. {format_ids(sorted(training)[:3])}."
        )
    if no_label:
        raise SKCDFInputError(
            f"{option}: case(s) {format_ids(no_label)} are imagesUnlabeled cases and have no label; "
            f"labelled and validation cases must come from imagesTr/labelsTr."
        )


def select_val(training_ids: Sequence[str], val: Amount, val_ids: Optional[Sequence[str]], seed: int,
               unlabeled_image_ids: Sequence[str] = ()) -> List[str]:
    """Validation cases: ``val_ids`` as given, else a seeded draw of ``val`` (fraction/count) cases.

    A fraction keeps at least one case when there are >= 2 training cases (so validation exists).
    """
    if val_ids is not None:
        repeated = sorted(c for c, n in Counter(val_ids).items() if n > 1)
        if repeated:
            raise SKCDFInputError(f"--val-ids lists {format_ids(repeated)} more than once: give each case once.")
        chosen = sorted(val_ids)
        _check_training_ids(chosen, "--val-ids", set(training_ids), set(unlabeled_image_ids))
        return chosen
    n = len(training_ids)
    amount = parse_amount(val, "--val")
    if isinstance(amount, float):
        n_val = _round_half_up(amount * n)
        n_val = max(n_val, 1) if n >= 2 else n_val
    else:
        n_val = amount
    if n_val > n:
        raise SKCDFInputError(f"--val {val}: {n_val} validation cases requested but the dataset has only {n} "
                              f"training cases. Use a smaller --val.")
    return _seeded_sample(training_ids, n_val, f"skcdf-val-{seed}")


def select_labeled(pool: Sequence[str], labeled: Amount, seed: int, n_val: int) -> List[str]:
    """The labelled subset of ``pool`` (training cases minus val): fraction, count or ``'all'``."""
    amount = parse_amount(labeled, "--labeled", allow_all=True)
    n = len(pool)
    if amount == "all":
        return sorted(pool)
    if isinstance(amount, float):
        n_lab = _round_half_up(amount * n)
        if n_lab == 0:
            raise SKCDFInputError(
                f"--labeled {labeled} of the {n} training cases left after {n_val} validation cases rounds to 0 "
                f"labelled cases. Use a larger fraction or a count, e.g. --labeled 1."
            )
    else:
        n_lab = amount
        if n_lab > n:
            raise SKCDFInputError(
                f"--labeled {labeled}: {n_lab} labelled cases requested but only {n} training cases are "
                f"available after taking out {n_val} validation cases. Use --labeled {n} (or 'all'), or fewer "
                f"validation cases (--val)."
            )
    return _seeded_sample(pool, n_lab, f"skcdf-labeled-{seed}")


# --------------------------------------------------------------------------------------------------
# mode (b): imported published lists
# --------------------------------------------------------------------------------------------------
def _role_overlaps(roles: Dict[str, Sequence[str]]) -> Dict[Tuple[str, str], List[str]]:
    """Ids shared by each pair of roles (only non-empty pairs)."""
    names = list(roles)
    result = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(roles[a]) & set(roles[b]))
            if shared:
                result[(a, b)] = shared
    return result


def drop_overlaps(roles: Dict[str, List[str]], drop_from: str,
                  test_ids: Sequence[str] = ()) -> Tuple[Dict[str, List[str]], List[str]]:
    """Remove from role ``drop_from`` every id that is also in another role or in the test list.

    Returns the new roles and notes that say which ids were dropped and why.
    """
    if drop_from not in ROLES:
        raise SKCDFInputError(f"--drop-overlaps-from {drop_from!r} is not valid: choose one of {', '.join(ROLES)}.")
    others = {r: set(ids) for r, ids in roles.items() if r != drop_from}
    others["test"] = set(test_ids)
    notes = []
    dropped: Set[str] = set()
    for other, ids in others.items():
        shared = sorted(set(roles[drop_from]) & ids)
        if shared:
            dropped.update(shared)
            notes.append(f"--drop-overlaps-from {drop_from}: dropped {len(shared)} id(s) from {drop_from} that are "
                         f"also {other}: {format_ids(shared)}")
    if not dropped:
        notes.append(f"--drop-overlaps-from {drop_from}: no overlaps, nothing dropped.")
    new_roles = dict(roles)
    new_roles[drop_from] = [i for i in roles[drop_from] if i not in dropped]
    return new_roles, notes


def _resolving_roles(overlaps: Dict[Tuple[str, str], List[str]], leaks: Dict[str, List[str]]) -> List[str]:
    """Roles whose ``--drop-overlaps-from`` alone would remove every overlap and test leak."""
    return [r for r in ROLES if all(r in pair for pair in overlaps) and all(role == r for role in leaks)]


def _leaks(roles: Dict[str, Sequence[str]], test_ids: Sequence[str]) -> Dict[str, List[str]]:
    test = set(test_ids)
    return {r: sorted(set(ids) & test) for r, ids in roles.items() if set(ids) & test}


def _import_fix_hint(lists: PublishedLists, roles: Dict[str, List[str]], test_ids: Sequence[str],
                     drop_from: Optional[str]) -> str:
    """The fix for overlaps and leaks, worked out on the lists as published (``roles`` before any
    ``--drop-overlaps-from``): what dropping from one role leaves over is no guide to which role to drop from."""
    fixers = _resolving_roles(_role_overlaps(roles), _leaks(roles, test_ids))
    on = "on the original lists, " if drop_from else ""
    where = (on + "; ".join(f"--drop-overlaps-from {r} resolves all of them (removes the shared ids from {r})"
                            for r in fixers) if fixers else
             f"{on}no single --drop-overlaps-from role resolves all of them")
    already = f" (after --drop-overlaps-from {drop_from})" if drop_from else ""
    files = ", ".join(lists.file_of(r) for r in ("labeled", "unlabeled", "val", "test"))
    return f"The published lists in {lists.folder} ({files}) are defective{already}: {where}; or fix the list files."


def import_roles(lists: PublishedLists, training_ids: Sequence[str], unlabeled_image_ids: Sequence[str],
                 id_template: Optional[str] = None) -> Tuple[Dict[str, List[str]], List[str]]:
    """Map the published ids to dataset case ids. Returns ``({role: ids}, mapped test ids)``."""
    mapper = IdMapper(list(training_ids) + list(unlabeled_image_ids), id_template)
    where = lists.folder
    sources = {
        "labeled": f"{lists.file_of('labeled')} (labelled) in {where}",
        "unlabeled": f"{lists.file_of('unlabeled')} (unlabelled: each needs an image in imagesTr or "
                     f"imagesUnlabeled) in {where}",
        "val": f"{lists.file_of('val')} (validation) in {where}",
    }
    roles = {r: mapper.map(getattr(lists, r), sources[r]) for r in ROLES}
    for r, ids in roles.items():
        repeated = sorted(c for c, n in Counter(ids).items() if n > 1)
        if repeated:
            raise SKCDFInputError(f"{sources[r]} lists {format_ids(repeated)} more than once. A list names each case "
                                  f"once: remove the repeated line(s).")
    # test cases need not be in the dataset (often they have no labels there): only those that are can leak
    test = mapper.map(lists.test, f"{lists.file_of('test')} in {where}", ignore_missing=True) if lists.test else []
    return roles, test


# --------------------------------------------------------------------------------------------------
# validation of any split list
# --------------------------------------------------------------------------------------------------
def _check_fold_structure(splits: object) -> None:
    if not isinstance(splits, list) or not splits:
        raise SKCDFInputError(f"A split file must hold a non-empty list of folds, got {type(splits).__name__}.")
    for i, fold in enumerate(splits):
        check_fold_entry(i, fold)


#: what each key of a fold holds, for messages
KEY_ROLES = {"train": "labelled", "val": "validation", "unlabeled": "unlabelled"}


def check_fold_entry(i: int, fold: object) -> None:
    """One fold's structure: a dict with 'train', 'val' (nnU-Net's keys) and 'unlabeled', each a list of case id
    strings without repeats. Runs before anything indexes the fold, so a broken fold is a message, not a KeyError."""
    if not isinstance(fold, dict):
        raise SKCDFInputError(f"fold {i}: each fold must be a dict with 'train' and 'val' (nnU-Net's format) and "
                              f"'unlabeled', got {type(fold).__name__}.")
    for key in ("train", "val"):
        if key not in fold:
            raise SKCDFInputError(f"fold {i}: no '{key}' key; each fold must be a dict with 'train' and 'val' "
                                  f"(nnU-Net's format) and 'unlabeled'.")
    if "unlabeled" not in fold:
        raise SKCDFInputError(
            f"fold {i} has no 'unlabeled' key: the split was not made with skcdf_split (it may be nnU-Net's "
            f"own 5-fold cross-validation split). {MAKE_ONE_HINT}"
        )
    for key in ("train", "val", "unlabeled"):
        ids = fold[key]
        if not isinstance(ids, list):
            raise SKCDFInputError(f"fold {i}: '{key}' must be a list of case id strings; got {plain(ids)!r} "
                                  f"({type(ids).__name__}).")
        for position, case in enumerate(ids, 1):
            if not isinstance(case, str):
                raise SKCDFInputError(f"fold {i}: '{key}' must be a list of case id strings; entry {position} is "
                                      f"{plain(case)!r} ({type(case).__name__}). Write ids as strings, e.g. "
                                      f"\"case_003\".")
        repeated = sorted(c for c, n in Counter(ids).items() if n > 1)
        if repeated:
            raise SKCDFInputError(f"fold {i}: '{key}' ({KEY_ROLES[key]}) lists {format_ids(repeated)} more than "
                                  f"once. A fold lists each case once: remove the repeated entries.")


def _check_fold_ids(i: int, fold: Fold, training: Set[str], unlabeled_images: Set[str]) -> None:
    """Every id must exist; labelled/val ids need a label; unlabelled ids need an image."""
    known = training | unlabeled_images
    unknown = {r: sorted(set(fold[ROLE_KEYS[r]]) - known) for r in ("labeled", "val")}
    unknown = {r: ids for r, ids in unknown.items() if ids}
    if unknown:
        detail = "; ".join(f"{r}: {format_ids(ids)}" for r, ids in unknown.items())
        raise SKCDFInputError(
            f"fold {i}: unknown case id(s) (not a training case in imagesTr and not an imagesUnlabeled case): "
            f"{detail}. Use the dataset's case ids or fix the split."
        )
    no_image = sorted(set(fold["unlabeled"]) - known)
    if no_image:
        raise SKCDFInputError(
            f"fold {i}: unlabelled id(s) with no image: {format_ids(no_image)} are neither training cases "
            f"(imagesTr) nor present in imagesUnlabeled. Add their images to imagesUnlabeled/ or remove them."
        )
    no_label = {r: sorted(set(fold[ROLE_KEYS[r]]) - training) for r in ("labeled", "val")}
    no_label = {r: ids for r, ids in no_label.items() if ids}
    if no_label:
        detail = "; ".join(f"{r}: {format_ids(ids)}" for r, ids in no_label.items())
        raise SKCDFInputError(
            f"fold {i}: imagesUnlabeled case(s) have no label but are used as labelled/validation cases: "
            f"{detail}. Only imagesTr/labelsTr cases can be labelled or validation cases."
        )


def _check_fold_roles(i: int, fold: Fold, test_ids: Sequence[str], hint: str) -> None:
    """Each case has one role; no test case has any role; at least one labelled case."""
    roles = {r: fold[ROLE_KEYS[r]] for r in ROLES}
    overlaps = _role_overlaps(roles)
    if overlaps:
        n = len(set().union(*map(set, overlaps.values())))
        detail = "\n".join(f"  {a} & {b}: {format_ids(ids)} ({len(ids)})" for (a, b), ids in overlaps.items())
        raise SKCDFInputError(
            f"fold {i}: {n} case(s) are in two roles, but each case must be exactly one of labelled, unlabelled "
            f"or validation:\n{detail}\n{hint}"
        )
    leaks = _leaks(roles, test_ids)
    if leaks:
        detail = "\n".join(f"  test & {r}: {format_ids(ids)} ({len(ids)})" for r, ids in leaks.items())
        raise SKCDFInputError(
            f"fold {i}: test leak: test case(s) from test.txt are used for training or validation:\n{detail}\n"
            f"Test cases must never be labelled, unlabelled or validation cases. {hint}"
        )
    if not fold["train"]:
        raise SKCDFInputError(
            f"fold {i}: no labelled case. Semi-supervised training needs at least one labelled case; use a "
            f"larger --labeled, fewer validation cases, or a list with labelled cases."
        )


def validate_splits(splits: Sequence[Fold], training_ids: Iterable[str], unlabeled_image_ids: Iterable[str],
                    test_ids: Sequence[str] = (),
                    hint: str = "Fix the split file or make it anew with skcdf_split.") -> None:
    """Check a split list (e.g. a loaded ``splits_final.json``); raise ``SKCDFInputError`` on the first problem.

    Checks: fold structure and the ``unlabeled`` key; imagesUnlabeled ids colliding with training ids;
    unknown ids; unlabelled ids without an image; labelled/val ids without a label; a case in two roles;
    a ``test_ids`` case in any role (test leak); a fold without labelled cases. ``hint`` ends the
    role-overlap and leak messages (the fix that applies where the split came from).
    """
    training, unlabeled_images = set(training_ids), set(unlabeled_image_ids)
    check_no_collisions(training, unlabeled_images)
    _check_fold_structure(splits)
    for i, fold in enumerate(splits):
        _check_fold_ids(i, fold, training, unlabeled_images)
        _check_fold_roles(i, fold, test_ids, hint)


def check_no_collisions(training_ids: Iterable[str], unlabeled_image_ids: Iterable[str]) -> None:
    """An imagesUnlabeled case may not share its id with a training case (ids would be ambiguous)."""
    both = sorted(set(training_ids) & set(unlabeled_image_ids))
    if both:
        raise SKCDFInputError(
            f"Case id(s) {format_ids(both)} exist both in imagesTr and in imagesUnlabeled. Ids must be unique "
            f"(preprocessed files of both would collide): rename the imagesUnlabeled files, e.g. add a prefix "
            f"'unl_'."
        )


# --------------------------------------------------------------------------------------------------
# the pure core
# --------------------------------------------------------------------------------------------------
@dataclass
class SplitResult:
    """Folds plus human-readable notes (dropped ids, mapping) that the caller prints."""

    folds: List[Fold]
    notes: List[str] = field(default_factory=list)


def _check_option_combinations(labeled: Optional[Amount], val_ids: Optional[Sequence[str]],
                               imported: Optional[PublishedLists], id_template: Optional[str],
                               drop_overlaps_from: Optional[str], folds: int, fold_mode: str) -> None:
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise SKCDFInputError(f"--folds {folds!r} is not valid: give an integer >= 1.")
    if fold_mode not in FOLD_MODES:
        raise SKCDFInputError(f"--fold-mode {fold_mode!r} is not valid: choose one of {', '.join(FOLD_MODES)}.")
    if imported is None:
        for flag, value in (("--id-template", id_template), ("--drop-overlaps-from", drop_overlaps_from)):
            if value is not None:
                raise SKCDFInputError(f"{flag} only applies to --import-lists (published lists); drop it.")
        return
    if labeled is not None:
        raise SKCDFInputError("--labeled and --import-lists exclude each other: the imported lists already say "
                              "which cases are labelled. Drop one of them.")
    if val_ids is not None:
        raise SKCDFInputError("--val-ids and --import-lists exclude each other: validation cases come from "
                              "eval.txt. Drop --val-ids (or edit eval.txt).")
    if fold_mode == "resample":
        raise SKCDFInputError("--fold-mode resample draws new labelled subsets and cannot be used with "
                              "--import-lists (the lists are fixed). Use --fold-mode repeat.")


def _imported_fold(imported: PublishedLists, training_ids: Sequence[str], unlabeled_image_ids: Sequence[str],
                   id_template: Optional[str], drop_overlaps_from: Optional[str]
                   ) -> Tuple[Fold, List[str], List[str], str]:
    """One fold from published lists; returns (fold, mapped test ids, notes, the fix hint for what is left)."""
    roles, test = import_roles(imported, training_ids, unlabeled_image_ids, id_template)
    hint = _import_fix_hint(imported, roles, test, drop_overlaps_from)
    notes = []
    if drop_overlaps_from is not None:
        roles, notes = drop_overlaps(roles, drop_overlaps_from, test)
    fold = {ROLE_KEYS[r]: sorted(roles[r]) for r in ("labeled", "val", "unlabeled")}
    in_test = set(training_ids) & set(test)
    unused = set(training_ids) - set().union(*map(set, roles.values())) - in_test
    if unused or in_test:
        notes.append(f"Not used: {len(unused)} training case(s) in none of the imported lists, {len(in_test)} "
                     f"test.txt case(s).")
    return fold, test, notes, hint


def _sampled_fold(training_ids: Sequence[str], val_cases: Sequence[str], labeled: Optional[Amount],
                  labeled_seed: int) -> Fold:
    """One fold of mode (a): the given val cases, a seeded labelled subset, the rest unlabelled (hidden)."""
    pool = sorted(set(training_ids) - set(val_cases))
    if not pool:
        raise SKCDFInputError(
            f"no labelled case: all {len(training_ids)} training cases are validation cases. Use fewer validation "
            f"cases (--val / --val-ids)."
        )
    labelled = select_labeled(pool, "all" if labeled is None else labeled, labeled_seed, len(val_cases))
    hidden = sorted(set(pool) - set(labelled))
    return {"train": labelled, "val": sorted(val_cases), "unlabeled": hidden}


def compute_semi_supervised_splits(
    training_ids: Sequence[str],
    unlabeled_image_ids: Sequence[str] = (),
    labeled: Optional[Amount] = None,
    val: Amount = DEFAULT_VAL,
    val_ids: Optional[Sequence[str]] = None,
    imported: Optional[PublishedLists] = None,
    id_template: Optional[str] = None,
    drop_overlaps_from: Optional[str] = None,
    add_unlabeled_images: bool = False,
    folds: int = 1,
    fold_mode: str = "repeat",
    seed: int = DEFAULT_SEED,
) -> SplitResult:
    """The split logic without I/O. See ``make_semi_supervised_splits`` for the options.

    ``imported`` holds the raw published ids (``read_published_lists``); ``val`` is ignored with it
    (validation comes from eval.txt). The result passed ``validate_splits``.
    """
    training_ids = sorted(training_ids)
    if not training_ids:
        raise SKCDFInputError("The dataset has no training cases (imagesTr is empty).")
    check_no_collisions(training_ids, unlabeled_image_ids)
    _check_option_combinations(labeled, val_ids, imported, id_template, drop_overlaps_from, folds, fold_mode)
    notes: List[str] = []
    test: List[str] = []
    hint = "Fix the split options."
    if imported is not None:
        fold, test, notes, hint = _imported_fold(imported, training_ids, unlabeled_image_ids, id_template,
                                                 drop_overlaps_from)
        result = [fold] * folds
    else:
        val_cases = select_val(training_ids, val, val_ids, seed, unlabeled_image_ids)
        # repeat: one split used N times (runs differ only by training seed); resample: fold i draws its
        # labelled subset with seed + i while val stays fixed, so the runs remain comparable
        seeds = [seed] * folds if fold_mode == "repeat" else [seed + i for i in range(folds)]
        result = [_sampled_fold(training_ids, val_cases, labeled, s) for s in seeds]
    if add_unlabeled_images:
        result = [{**f, "unlabeled": sorted(set(f["unlabeled"]) | set(unlabeled_image_ids))} for f in result]
    # independent copies: a caller editing one fold must not change the others
    result = [{k: list(f[k]) for k in ("train", "val", "unlabeled")} for f in result]
    validate_splits(result, training_ids, unlabeled_image_ids, test, hint)
    return SplitResult(result, notes)


# --------------------------------------------------------------------------------------------------
# reading the dataset, writing and loading the split file
# --------------------------------------------------------------------------------------------------
@dataclass
class SplitReport:
    """What ``skcdf_split`` wrote, with what the summary needs to tell the sources apart."""

    folds: List[Fold]
    path: str
    dataset: str
    training_ids: List[str]
    unlabeled_image_ids: List[str]
    notes: List[str]


def _write_splits(folds: List[Fold], path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise SKCDFInputError(
            f"{path} already exists (it may be nnU-Net's own 5-fold cross-validation split, written by the first "
            f"nnUNetv2_train run, or an earlier skcdf_split). Re-run with --overwrite to replace it "
            f"(Python: overwrite=True)."
        )
    # atomic: a training run starting meanwhile reads either the old or the new complete file
    atomic_save_json(folds, path)


def _refuse_nothing_to_add(raw: str, file_ending: str) -> None:
    """--add-unlabeled-images asked for imagesUnlabeled cases: a split silently without them is not what was meant."""
    folder = os.path.join(raw, UNLABELED_IMAGES_FOLDER)
    state = "is empty" if os.path.isdir(folder) else "does not exist"
    raise SKCDFInputError(
        f"--add-unlabeled-images: {folder} {state}, so there are no unlabelled images to add. Put the images there "
        f"(nnU-Net's channel naming, e.g. case_0000{file_ending}) and run skcdf_preprocess_unlabeled, or drop "
        f"--add-unlabeled-images.")


def build_split_report(
    dataset: Union[int, str],
    labeled: Optional[Amount] = None,
    val: Amount = DEFAULT_VAL,
    val_ids: Optional[Sequence[str]] = None,
    import_lists: Optional[str] = None,
    ratio: Optional[str] = None,
    id_template: Optional[str] = None,
    drop_overlaps_from: Optional[str] = None,
    add_unlabeled_images: bool = False,
    folds: int = 1,
    fold_mode: str = "repeat",
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
) -> SplitReport:
    """``make_semi_supervised_splits`` returning the full report (used by the console script)."""
    if (import_lists is None) != (ratio is None):
        raise SKCDFInputError("--import-lists and --ratio go together: e.g. --import-lists splits/amos --ratio 20p "
                              "reads labeled_20p.txt, unlabeled_20p.txt and eval.txt.")
    raw = raw_dataset_folder(dataset)
    dataset_json = load_dataset_json(raw)
    training_ids = training_case_ids(raw, dataset_json)
    unlabeled_image_ids = sorted(list_unlabeled_cases(raw, dataset_json))
    if add_unlabeled_images and not unlabeled_image_ids:
        _refuse_nothing_to_add(raw, dataset_json["file_ending"])
    imported = read_published_lists(import_lists, ratio) if import_lists is not None else None
    result = compute_semi_supervised_splits(
        training_ids, unlabeled_image_ids, labeled=labeled, val=val, val_ids=val_ids, imported=imported,
        id_template=id_template, drop_overlaps_from=drop_overlaps_from, add_unlabeled_images=add_unlabeled_images,
        folds=folds, fold_mode=fold_mode, seed=seed,
    )
    path = os.path.join(preprocessed_dataset_folder(dataset, must_exist=False), SPLITS_FILE)
    _write_splits(result.folds, path, overwrite)
    return SplitReport(result.folds, path, dataset_name(dataset), training_ids, unlabeled_image_ids, result.notes)


def make_semi_supervised_splits(
    dataset: Union[int, str],
    labeled: Optional[Amount] = None,
    val: Amount = DEFAULT_VAL,
    val_ids: Optional[Sequence[str]] = None,
    import_lists: Optional[str] = None,
    ratio: Optional[str] = None,
    id_template: Optional[str] = None,
    drop_overlaps_from: Optional[str] = None,
    add_unlabeled_images: bool = False,
    folds: int = 1,
    fold_mode: str = "repeat",
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
) -> List[Fold]:
    """Make ``nnUNet_preprocessed/DatasetX/splits_final.json`` for semi-supervised training; return the folds.

    Args:
        dataset: dataset id or ``DatasetNNN_Name`` (raw data are read from ``nnUNet_raw``).
        labeled: fraction (0 < X < 1), count (>= 1) or ``'all'`` of the non-validation training cases
            that keep their labels; the others become unlabelled. ``None``: all (unless importing).
        val: fraction or count of the training cases used for validation (ignored with ``val_ids``
            and with ``import_lists``, where eval.txt is the validation list).
        val_ids: explicit validation case ids.
        import_lists: folder with published DHC/SKCDF lists; needs ``ratio`` (e.g. ``'20p'``).
        id_template: maps list ids to case ids, e.g. ``'amos_{}'``.
        drop_overlaps_from: ``'val'``/``'labeled'``/``'unlabeled'``: remove ids shared with other roles
            (or test.txt) from that role instead of failing.
        add_unlabeled_images: add every ``imagesUnlabeled`` case to every fold's ``unlabeled`` list.
        folds, fold_mode: ``repeat`` writes the same split ``folds`` times; ``resample`` draws fold i's
            labelled subset with ``seed + i`` (validation fixed).
        seed: seed of the random draws.
        overwrite: replace an existing ``splits_final.json``.

    Notes (dropped ids, unused cases) are printed. Raises ``SKCDFInputError`` on bad input.
    """
    report = build_split_report(dataset, labeled, val, val_ids, import_lists, ratio, id_template,
                                drop_overlaps_from, add_unlabeled_images, folds, fold_mode, seed, overwrite)
    for note in report.notes:
        print(note)
    return report.folds


def load_semi_supervised_fold(preprocessed_folder: str,
                              fold: Union[int, str]) -> Tuple[List[str], List[str], List[str]]:
    """``(train_ids, val_ids, unlabeled_ids)`` of one fold of ``preprocessed_folder/splits_final.json``."""
    path = os.path.join(preprocessed_folder, SPLITS_FILE)
    splits = read_json(path, MAKE_ONE_HINT, "semi-supervised training needs it")
    try:
        index = int(fold)
    except (TypeError, ValueError):
        raise SKCDFInputError(f"fold {fold!r}: semi-supervised training needs a fold index (0, 1, ...) of {path}; "
                              f"'all' has no unlabelled cases.") from None
    if not isinstance(splits, list) or not 0 <= index < len(splits):
        n = len(splits) if isinstance(splits, list) else 0
        raise SKCDFInputError(
            f"fold {index} is out of range: {path} has {n} fold(s) (0..{n - 1}). Train one of those folds or make "
            f"more with skcdf_split --folds {index + 1} --overwrite."
        )
    entry = splits[index]
    if not isinstance(entry, dict) or "unlabeled" not in entry:
        raise SKCDFInputError(
            f"fold {index} of {path} has no 'unlabeled' key: the split was not made with skcdf_split (it may be "
            f"nnU-Net's own 5-fold cross-validation split). {MAKE_ONE_HINT}"
        )
    try:
        check_fold_entry(index, entry)
    except SKCDFInputError as e:
        raise SKCDFInputError(f"{path}: {e} Fix the file, or make it anew: {MAKE_ONE_HINT}") from None
    return list(entry["train"]), list(entry["val"]), list(entry["unlabeled"])


# --------------------------------------------------------------------------------------------------
# console script
# --------------------------------------------------------------------------------------------------
EXAMPLES = """examples:
  # 20% of the non-validation cases labelled, the rest unlabelled, 20% validation, 3 identical folds
  skcdf_split -d 3 --labeled 0.2 --folds 3
  # 8 labelled cases, fixed validation cases, 3 folds each with a different labelled subset
  skcdf_split -d 3 --labeled 8 --val-ids case_001 case_002 --folds 3 --fold-mode resample
  # the published AMOS 20% lists (ids 'amos_0001'), dropping the cases they share with eval.txt from val
  skcdf_split -d 5 --import-lists splits/amos --ratio 20p --drop-overlaps-from val
  # published Synapse lists ('0001') mapped to case ids 'synapse_0001'
  skcdf_split -d 4 --import-lists splits/synapse --ratio 20p --id-template 'synapse_{}'
  # all non-validation training cases labelled + every imagesUnlabeled case unlabelled
  skcdf_split -d 3 --add-unlabeled-images

Fold i of the file trains SKCDF and, on the same split, the labelled-only baseline:
  nnUNetv2_train DATASET CONFIG i -tr nnUNetTrainer
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``skcdf_split`` argument parser."""
    p = argparse.ArgumentParser(
        prog="skcdf_split", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Write nnUNet_preprocessed/DatasetX/splits_final.json for semi-supervised training.\n"
                    "Each fold is {train: labelled ids, val: ids, unlabeled: ids}. nnU-Net reads train/val and\n"
                    "ignores unlabeled, so the same file also drives the labelled-only nnUNetTrainer baseline.\n"
                    "Modes (a), (b) and (c) below combine; without (a) or (b) every non-validation training\n"
                    "case is labelled.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetNNN_X)")
    g = p.add_argument_group("(a) random labelled subset")
    g.add_argument("--labeled", help="fraction 0<X<1, count >=1 or 'all' of the training cases left after "
                                     "validation; the others become unlabelled (labels hidden). Default: all")
    g.add_argument("--val", help=f"fraction 0<X<1 or count >=1 of the training cases used for validation "
                                 f"(default {DEFAULT_VAL}; at least 1 case when there are >= 2)")
    g.add_argument("--val-ids", nargs="+", metavar="ID", help="explicit validation case ids (instead of --val)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the random draws (default {DEFAULT_SEED})")
    g = p.add_argument_group("(b) published DHC/SKCDF lists")
    g.add_argument("--import-lists", metavar="DIR", help="folder with labeled_<ratio>.txt, unlabeled_<ratio>.txt, "
                                                         "eval.txt (validation) and optional test.txt (leak check)")
    g.add_argument("--ratio", help="the lists' ratio suffix, e.g. 20p")
    g.add_argument("--id-template", metavar="TEMPLATE", help="map list ids to case ids, e.g. 'amos_{}' "
                                                             "(default: exact, then unique '*_<id>' match)")
    g.add_argument("--drop-overlaps-from", choices=ROLES, help="remove ids that are in two roles (or in test.txt) "
                                                               "from this role instead of failing")
    g = p.add_argument_group("(c) unlabelled images")
    g.add_argument("--add-unlabeled-images", action="store_true",
                   help="add every case of nnUNet_raw/DatasetX/imagesUnlabeled to every fold's unlabeled list")
    g = p.add_argument_group("folds and output")
    g.add_argument("--folds", type=int, default=1, help="number of folds (default 1)")
    g.add_argument("--fold-mode", choices=FOLD_MODES, default="repeat",
                   help="repeat: the identical split N times (repeated runs, as in the paper); resample: fold i "
                        "draws its labelled subset with seed+i, validation fixed (default repeat)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing splits_final.json")
    return p


def _check_cli_conflicts(args: argparse.Namespace) -> None:
    # the API cannot tell a default --val from an explicit one; the CLI can, so it rejects silent ignores
    if args.val is not None and args.val_ids is not None:
        raise SKCDFInputError("--val and --val-ids exclude each other: give the validation cases one way.")
    if args.val is not None and args.import_lists is not None:
        raise SKCDFInputError("--val and --import-lists exclude each other: validation cases come from eval.txt.")


def format_summary(report: SplitReport, fold_mode: str) -> str:
    """Per fold: #labelled, #unlabelled by source (hidden-label training cases / imagesUnlabeled), #val."""
    training = set(report.training_ids)
    lines = [f"{report.dataset}: {len(report.folds)} fold(s), mode {fold_mode}"]
    for i, fold in enumerate(report.folds):
        hidden = sum(c in training for c in fold["unlabeled"])
        extra = len(fold["unlabeled"]) - hidden
        lines.append(f"  fold {i}: {len(fold['train'])} labelled, {len(fold['unlabeled'])} unlabelled "
                     f"({hidden} training cases with hidden labels + {extra} imagesUnlabeled), "
                     f"{len(fold['val'])} val")
    lines.append(f"Wrote {report.path}")
    lines.append(f"Labelled-only baseline on the same split: nnUNetv2_train {report.dataset} CONFIG FOLD "
                 f"-tr nnUNetTrainer")
    return "\n".join(lines)


def split_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``skcdf_split``; input errors print ``ERROR: ...`` and exit with status 2."""
    args = build_parser().parse_args(argv)
    with exit_on_input_error():
        _check_cli_conflicts(args)
        report = build_split_report(
            args.dataset, labeled=args.labeled, val=DEFAULT_VAL if args.val is None else args.val,
            val_ids=args.val_ids, import_lists=args.import_lists, ratio=args.ratio, id_template=args.id_template,
            drop_overlaps_from=args.drop_overlaps_from, add_unlabeled_images=args.add_unlabeled_images,
            folds=args.folds, fold_mode=args.fold_mode, seed=args.seed, overwrite=args.overwrite,
        )
    for note in report.notes:
        print(note)
    print(format_summary(report, args.fold_mode))


if __name__ == "__main__":
    split_entry()

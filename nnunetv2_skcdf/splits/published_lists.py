"""Published semi-supervised split lists in the DHC/SKCDF text format, and mapping their ids.

DHC and SKCDF publish one text file per role, one case id per line::

    labeled_<ratio>.txt     labelled training cases   (e.g. labeled_20p.txt)
    unlabeled_<ratio>.txt   training cases whose labels are hidden
    eval.txt                validation cases
    test.txt                test cases (optional here; only used to detect test leakage)

Their ids rarely equal the case ids of an nnU-Net dataset (``0001`` vs ``synapse_0001``), so
``map_list_ids`` translates them: exact match, then an explicit ``--id-template``, then an automatic
match that must be unique. Reading files is separated from mapping so the mapping stays pure.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

#: How many ids an error message lists before it says "... and N more" (keeps messages readable).
MAX_IDS_IN_MESSAGE = 40


def format_ids(ids: Iterable[str], limit: int = MAX_IDS_IN_MESSAGE) -> str:
    """``a, b, c`` (sorted), truncated to ``limit`` ids with a count of the rest."""
    ids = sorted(ids)
    shown = ", ".join(ids[:limit])
    if len(ids) > limit:
        shown += f", ... and {len(ids) - limit} more"
    return shown


def normalize_ratio(ratio: str | int) -> str:
    """``20`` / ``'20'`` / ``'20p'`` -> ``'20p'`` (the suffix used in the published file names)."""
    ratio = str(ratio).strip()
    return ratio + "p" if ratio.isdigit() else ratio


def list_file_names(ratio: str) -> Dict[str, str]:
    """File name of each role's list for ``ratio`` (``test`` is optional)."""
    return {
        "labeled": f"labeled_{ratio}.txt",
        "unlabeled": f"unlabeled_{ratio}.txt",
        "val": "eval.txt",
        "test": "test.txt",
    }


@dataclass(frozen=True)
class PublishedLists:
    """The raw ids of one published split (not yet mapped to dataset case ids)."""

    folder: str
    ratio: str
    labeled: List[str]
    unlabeled: List[str]
    val: List[str]
    #: ``None`` when the folder has no ``test.txt`` (then test leakage cannot be checked).
    test: Optional[List[str]] = None

    def file_of(self, role: str) -> str:
        """The file a role was read from, for error messages."""
        return list_file_names(self.ratio)[role]


def read_id_list(path: str) -> List[str]:
    """Ids of a list file in file order: one per line; blank lines and ``#`` comments are skipped."""
    with open(path) as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def available_ratios(folder: str) -> List[str]:
    """Ratios with both a labelled and an unlabelled list in ``folder`` (for error messages)."""
    found = set()
    for fname in os.listdir(folder):
        m = re.fullmatch(r"labeled_(.+)\.txt", fname)
        if m and os.path.isfile(os.path.join(folder, f"unlabeled_{m[1]}.txt")):
            found.add(m[1])
    return sorted(found, key=lambda r: (len(r), r))


def read_published_lists(folder: str, ratio: str | int) -> PublishedLists:
    """Read ``labeled_<ratio>.txt``, ``unlabeled_<ratio>.txt``, ``eval.txt`` and optional ``test.txt``."""
    if not os.path.isdir(folder):
        raise SKCDFInputError(f"--import-lists folder {folder} does not exist (give the folder that holds "
                              f"labeled_<ratio>.txt, unlabeled_<ratio>.txt and eval.txt).")
    ratio = normalize_ratio(ratio)
    names = list_file_names(ratio)
    missing = [names[r] for r in ("labeled", "unlabeled", "val") if not os.path.isfile(os.path.join(folder, names[r]))]
    if missing:
        ratios = available_ratios(folder)
        raise SKCDFInputError(
            f"Missing list file(s) in {folder}: {', '.join(missing)}. Importing ratio {ratio!r} needs "
            f"{names['labeled']}, {names['unlabeled']} and {names['val']}. "
            + (f"Ratios available there: {', '.join(ratios)} (use --ratio {ratios[0]} etc.)."
               if ratios else "That folder has no labeled_<ratio>.txt/unlabeled_<ratio>.txt pair.")
        )
    lists = {role: read_id_list(os.path.join(folder, names[role])) for role in ("labeled", "unlabeled", "val")}
    test_path = os.path.join(folder, names["test"])
    test = read_id_list(test_path) if os.path.isfile(test_path) else None
    return PublishedLists(folder=folder, ratio=ratio, test=test, **lists)


#: AMOS numbers its CT scans 1..500 and its MRI scans 501..600 (``skcdf_convert_amos`` keeps MRI only on request)
AMOS_CT_MAX_ID = 500
_AMOS_ID = re.compile(r"(?:amos_)?(\d+)")


def amos_mri_ids(list_ids: Sequence[str], dataset_ids: Sequence[str]) -> List[str]:
    """The AMOS MRI ids (number > 500) among ``list_ids`` when the dataset is an AMOS conversion without any MRI case;
    ``[]`` otherwise."""
    numbers = [int(m[1]) for m in map(_AMOS_ID.fullmatch, dataset_ids) if m]
    if not any(i.startswith("amos_") for i in dataset_ids) or any(n > AMOS_CT_MAX_ID for n in numbers):
        return []
    return [i for i in list_ids if (m := _AMOS_ID.fullmatch(i)) and int(m[1]) > AMOS_CT_MAX_ID]


def _common_prefix(ids: Sequence[str]) -> str:
    """Shared prefix of the case ids without trailing digits (``case0001``, ``case0012`` -> ``case``)."""
    return os.path.commonprefix(list(ids)).rstrip("0123456789") if ids else ""


def _apply_template(template: str, list_id: str) -> str:
    try:
        return template.format(list_id)
    except (IndexError, KeyError, ValueError) as e:
        raise SKCDFInputError(
            f"--id-template {template!r} is not a valid template ({e}). It must contain '{{}}' where the list "
            f"id goes, e.g. --id-template 'amos_{{}}' maps '0001' to 'amos_0001'."
        ) from None


def _suggest_template(known_ids: Sequence[str]) -> str:
    """A guess at the template from the dataset's ids (``synapse_0001`` -> ``synapse_{}``)."""
    example = sorted(known_ids)[0] if known_ids else "case_0001"
    m = re.fullmatch(r"(.*?)(\d+)", example)
    return (m[1] if m else "PREFIX_") + "{}"


class IdMapper:
    """Maps published list ids to dataset case ids (exact, then template, then unique automatic match)."""

    def __init__(self, known_ids: Iterable[str], id_template: Optional[str] = None) -> None:
        self.known = sorted(set(known_ids))
        self._known_set = set(self.known)
        self.template = id_template
        self.prefix = _common_prefix(self.known)

    def candidates(self, list_id: str) -> List[str]:
        """All dataset ids ``list_id`` may stand for (one = mapped, none = missing, more = ambiguous)."""
        if list_id in self._known_set:
            return [list_id]
        if self.template is not None:
            # an explicit template is authoritative: no guessing behind it, so typos surface as errors
            mapped = _apply_template(self.template, list_id)
            return [mapped] if mapped in self._known_set else []
        suffix = "_" + list_id
        return sorted({c for c in self.known if c.endswith(suffix) or c == self.prefix + list_id})

    def _refuse_missing_amos_mri(self, missing: Sequence[str], source: str) -> None:
        """Missing ids that are all AMOS MRI cases of a CT-only conversion: the fix is the conversion, not a template."""
        mri = amos_mri_ids(missing, self.known)
        if mri and len(mri) == len(missing):
            raise SKCDFInputError(
                f"{len(missing)} id(s) of {source} match no case of the dataset: {format_ids(missing)}. These are AMOS "
                f"MRI cases (ids > {AMOS_CT_MAX_ID}), which are not in the dataset: skcdf_convert_amos leaves them out "
                f"unless --keep-mri. Convert AMOS again with skcdf_convert_amos --keep-mri to use the published lists "
                f"as they are, or remove these ids from the list.")

    def map(self, ids: Sequence[str], source: str, ignore_missing: bool = False) -> List[str]:
        """Map every id of one list; all problems of the list are reported in one error.

        ``source`` names the list file in messages. With ``ignore_missing`` ids without a match are
        dropped (used for ``test.txt``, whose cases need not be part of the dataset).
        """
        mapped: List[str] = []
        missing: List[str] = []
        ambiguous: Dict[str, List[str]] = {}
        for list_id in ids:
            found = self.candidates(list_id)
            if len(found) == 1:
                mapped.append(found[0])
            elif not found:
                missing.append(list_id)
            else:
                ambiguous[list_id] = found
        if ambiguous:
            detail = "; ".join(f"{k!r} -> {', '.join(v)}" for k, v in sorted(ambiguous.items())[:MAX_IDS_IN_MESSAGE])
            raise SKCDFInputError(
                f"{len(ambiguous)} id(s) of {source} match several dataset cases: {detail}. Give the mapping "
                f"explicitly with --id-template, e.g. --id-template '{_suggest_template(self.known)}'."
            )
        if missing and not ignore_missing:
            self._refuse_missing_amos_mri(missing, source)
            how = (f"--id-template {self.template!r} maps them to "
                   f"{format_ids(_apply_template(self.template, i) for i in missing[:5])}, which are not cases"
                   if self.template is not None else "no exact, '*_<id>' or prefix match")
            mri = amos_mri_ids(missing, self.known)
            raise SKCDFInputError(
                f"{len(missing)} id(s) of {source} match no case of the dataset ({how}): {format_ids(missing)}. "
                f"Dataset case ids look like {format_ids(self.known[:3])}. Give the mapping with --id-template, "
                f"e.g. --id-template '{_suggest_template(self.known)}', or fix the list."
                + (f" ({len(mri)} of them are AMOS MRI cases, ids > {AMOS_CT_MAX_ID}: convert AMOS with "
                   f"skcdf_convert_amos --keep-mri to have them.)" if mri else "")
            )
        return mapped

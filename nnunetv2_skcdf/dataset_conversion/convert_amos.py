"""AMOS 2022 (abdominal multi-organ CT and MRI, 15 organs) -> nnU-Net v2 raw dataset.

Source: the post-challenge release (https://zenodo.org/record/7262581), i.e. its ``dataset.json`` and
``imagesTr``/``labelsTr`` (240 cases), ``imagesVa``/``labelsVa`` (120), optional ``imagesTs`` (no labels).
Case ids stay ``amos_XXXX``. AMOS numbers its CT scans 1..500 and its MRI scans 501..600.

Where the published DHC/SKCDF lists come from (DHC's ``code/data/preprocess_amos.py``): train.txt
(216) + eval.txt (24) are a 90/10 random split of AMOS imagesTr, test.txt (120) is AMOS imagesVa. They
keep the MRI scans (34 train, 6 eval, 20 test ids are > 500). Hence the defaults here: imagesVa goes
to imagesTs/labelsTs (the test set), and reproducing those lists needs ``--keep-mri``.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_skcdf.dataset_conversion.conversion_common import (
    FILE_ENDING,
    CaseJob,
    add_output_arguments,
    check_dataset_id_and_name,
    check_num_processes,
    make_subfolders,
    output_root_folder,
    run_case_jobs,
    staged_dataset,
    verify_with_nnunet,
)
from nnunetv2_skcdf.splits.published_lists import format_ids
from nnunetv2_skcdf.utilities.dataset_files import UNLABELED_IMAGES_FOLDER, SKCDFInputError, exit_on_input_error
from nnunetv2_skcdf.utilities.io import read_json

#: AMOS ids up to this number are CT, above it MRI (AMOS numbering; nnU-Net's Dataset218 converter relies on it).
CT_MAX_ID = 500
VALIDATION_TO = ("imagesTs", "imagesTr", "skip")
TEST_IMAGES_TO = ("skip", UNLABELED_IMAGES_FOLDER)
#: Where the AMOS files may sit below SOURCE (the archive unpacks into amos22/).
LAYOUTS: Tuple[str, ...] = ("", "amos22")
#: channel name when MRI scans are kept: anything but "CT" gives per-image z-score normalisation in nnU-Net
#: (as nnU-Net's own Dataset219_Amos2022_task2); "CT" would apply one global CT intensity window to MRI too.
MIXED_CHANNEL_NAME = "either_CT_or_MR"
_CASE_RE = re.compile(r"^amos_(\d{4})$")


@dataclass
class AmosCase:
    case_id: str
    image: str
    label: Optional[str]  # None for the unlabelled test images

    @property
    def is_mri(self) -> bool:
        return int(_CASE_RE.match(self.case_id)[1]) > CT_MAX_ID


@dataclass
class AmosSource:
    folder: str
    labels: Dict[str, int]  # nnU-Net {name: id}, background 0
    sets: Dict[str, List[AmosCase]] = field(default_factory=dict)  # "training"/"validation"/"test"


# --------------------------------------------------------------------------------------------------
# reading the source folder
# --------------------------------------------------------------------------------------------------
def find_amos_layout(source: str) -> str:
    """The folder below ``source`` with AMOS's dataset.json, imagesTr and labelsTr (see ``LAYOUTS``)."""
    if not os.path.isdir(source):
        raise SKCDFInputError(f"Source folder {source} does not exist.")
    for rel in LAYOUTS:
        folder = os.path.join(source, rel)
        if all(os.path.exists(os.path.join(folder, n)) for n in ("dataset.json", "imagesTr", "labelsTr")):
            return folder
    entries = sorted(os.listdir(source))
    raise SKCDFInputError(
        f"{source} does not look like the AMOS 2022 data. Expected (directly in SOURCE or in SOURCE/amos22):\n"
        f"  dataset.json, imagesTr/amos_XXXX.nii.gz, labelsTr/amos_XXXX.nii.gz, imagesVa/, labelsVa/ "
        f"(and optionally imagesTs/)\nFound in {source}: {', '.join(entries[:20]) or 'nothing'}"
        + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
        + "\nDownload the post-challenge release (https://zenodo.org/record/7262581) and unpack amos22.zip."
    )


def amos_labels(dataset_json: dict, path: str) -> Dict[str, int]:
    """AMOS ``{"0": "background", "1": "spleen", ...}`` -> nnU-Net ``{"background": 0, "spleen": 1, ...}``."""
    raw = dataset_json.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise SKCDFInputError(f"{path} has no 'labels' entry ({{\"0\": \"background\", \"1\": \"spleen\", ...}}).")
    try:
        by_id = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise SKCDFInputError(f"{path}: 'labels' must map label values to names, got keys {list(raw)[:5]}.") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise SKCDFInputError(f"{path}: label values must be 0, 1, ..., N without gaps, got {sorted(by_id)}.")
    names = [by_id[i] for i in range(1, len(by_id))]
    if len(set(names)) != len(names) or "background" in names:
        raise SKCDFInputError(f"{path}: label names must be unique (and 'background' only for 0): {names}.")
    labels = {"background": 0}
    labels.update({name: i for i, name in enumerate(names, start=1)})
    return labels


def _entry_path(entry, key: str, folder: str, where: str) -> str:
    value = entry.get(key) if isinstance(entry, dict) else entry
    if not isinstance(value, str):
        raise SKCDFInputError(f"{where}: entry {entry!r} has no {key!r} path.")
    return os.path.normpath(os.path.join(folder, value))


def _case_id(image_path: str, where: str) -> str:
    name = os.path.basename(image_path)
    case_id = name[: -len(FILE_ENDING)] if name.endswith(FILE_ENDING) else name
    if not _CASE_RE.match(case_id):
        raise SKCDFInputError(f"{where}: {name} is not named amos_XXXX{FILE_ENDING} (XXXX = 4 digits).")
    return case_id


def read_amos_source(source: str) -> AmosSource:
    """The AMOS dataset.json's labels and its training/validation/test cases (paths not yet checked)."""
    folder = find_amos_layout(os.path.abspath(source))
    json_path = os.path.join(folder, "dataset.json")
    dataset_json = read_json(json_path, "It is the dataset.json of the AMOS release (amos22): unpack the archive "
                                        "again.")
    result = AmosSource(folder, amos_labels(dataset_json, json_path))
    seen: Dict[str, str] = {}
    for key in ("training", "validation", "test"):
        cases = []
        for entry in dataset_json.get(key, []):
            image = _entry_path(entry, "image", folder, f"{json_path} '{key}'")
            case_id = _case_id(image, f"{json_path} '{key}'")
            if case_id in seen:
                raise SKCDFInputError(f"{json_path}: case {case_id} is listed in '{seen[case_id]}' and '{key}'.")
            seen[case_id] = key
            label = None if key == "test" else _entry_path(entry, "label", folder, f"{json_path} '{key}'")
            cases.append(AmosCase(case_id, image, label))
        result.sets[key] = sorted(cases, key=lambda c: c.case_id)
    if not result.sets["training"]:
        raise SKCDFInputError(f"{json_path} lists no 'training' cases.")
    return result


def check_amos_files(src: AmosSource, plan: "_Plan") -> None:
    """Every image and label of the planned cases exists; one error lists every missing file."""
    if "validation" in plan.from_set.values() and not os.path.isdir(os.path.join(src.folder, "labelsVa")):
        raise SKCDFInputError(
            f"{os.path.join(src.folder, 'labelsVa')} does not exist: this AMOS copy has no validation labels "
            f"(challenge-time release). Use the post-challenge release (https://zenodo.org/record/7262581) "
            f"or --validation-to skip."
        )
    problems = []
    for case in (plan.cases[c] for c in sorted(plan.cases)):
        for kind, path in (("image", case.image), ("label", case.label)):
            if path is not None and not os.path.isfile(path):
                problems.append(f"  case {case.case_id}: {kind} {os.path.relpath(path, src.folder)} is missing")
    if problems:
        raise SKCDFInputError(
            f"{len(problems)} file(s) listed in {os.path.join(src.folder, 'dataset.json')} are missing:\n"
            + "\n".join(problems[:40]) + (f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else "")
            + "\nRestore them from the AMOS archive (every image needs its label and vice versa), or leave the "
              "case out (e.g. --validation-to skip for imagesVa), then run again."
        )


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Which AMOS cases go where (output folder pair per case)."""

    placement: Dict[str, Tuple[str, Optional[str]]] = field(default_factory=dict)  # case -> (images, labels)
    cases: Dict[str, AmosCase] = field(default_factory=dict)
    from_set: Dict[str, str] = field(default_factory=dict)  # case -> AMOS set ("training", ...)
    excluded_mri: List[str] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)  # AMOS set -> number of cases left out

    def count(self, images_dir: str) -> int:
        return sum(1 for d, _ in self.placement.values() if d == images_dir)

    def has_mri(self) -> bool:
        return any(self.cases[c].is_mri for c in self.placement)


def plan_amos(src: AmosSource, keep_mri: bool, validation_to: str, test_images_to: str) -> _Plan:
    destinations = {
        "training": ("imagesTr", "labelsTr"),
        "validation": {"imagesTr": ("imagesTr", "labelsTr"), "imagesTs": ("imagesTs", "labelsTs"),
                       "skip": None}[validation_to],
        "test": None if test_images_to == "skip" else (UNLABELED_IMAGES_FOLDER, None),
    }
    plan = _Plan()
    for key, dest in destinations.items():
        if dest is None:
            if src.sets[key]:
                plan.skipped[key] = len(src.sets[key])
            continue
        for case in src.sets[key]:
            if case.is_mri and not keep_mri:
                plan.excluded_mri.append(case.case_id)
                continue
            plan.placement[case.case_id] = dest
            plan.cases[case.case_id] = case
            plan.from_set[case.case_id] = key
    return plan


def _jobs(plan: _Plan, out: str, max_label: int) -> List[CaseJob]:
    jobs = []
    for case_id, (images_dir, labels_dir) in sorted(plan.placement.items()):
        case = plan.cases[case_id]
        label_dst = None if labels_dir is None else os.path.join(out, labels_dir, f"{case_id}{FILE_ENDING}")
        jobs.append(CaseJob(case_id, case.image, os.path.join(out, images_dir, f"{case_id}_0000{FILE_ENDING}"),
                            case.label, label_dst, max_label))
    return jobs


def _write_dataset_json(folder: str, name: str, labels: Dict[str, int], plan: _Plan, validation_to: str) -> None:
    channel = MIXED_CHANNEL_NAME if plan.has_mri() else "CT"
    modality = "CT and MRI (ids > 500 are MRI)" if plan.has_mri() else "CT only (AMOS ids <= 500)"
    where_va = {"imagesTr": "imagesTr/labelsTr (training pool, as nnU-Net's Dataset218)",
                "imagesTs": "imagesTs/labelsTs (test set; the published DHC/SKCDF test.txt)",
                "skip": "not converted"}[validation_to]
    generate_dataset_json(
        folder, {0: channel}, dict(labels), plan.count("imagesTr"), FILE_ENDING, dataset_name=name,
        reference="https://amos22.grand-challenge.org/", release="https://zenodo.org/record/7262581",
        description=(
            f"AMOS 2022 abdominal multi-organ segmentation ({len(labels) - 1} organs), {modality}, converted by "
            f"nnunetv2_skcdf (skcdf_convert_amos). AMOS imagesTr -> imagesTr/labelsTr; AMOS imagesVa -> {where_va}."
        ),
        license="CC BY 4.0 (AMOS 2022)",
        converted_by="nnunetv2_skcdf skcdf_convert_amos",
        numTest=plan.count("imagesTs"),
        excluded_mri_cases=sorted(plan.excluded_mri),
    )


def convert_amos(source: str, dataset_id: int, name: str = "AMOS", keep_mri: bool = False,
                 validation_to: str = "imagesTs", test_images_to: str = "skip", num_processes: int = 1,
                 overwrite: bool = False, verify: bool = True, output_root: Optional[str] = None,
                 progress: bool = True) -> str:
    """Convert AMOS 2022 at ``source`` into ``<output_root>/Dataset<id>_<name>``; return its path.

    ``output_root`` defaults to ``$nnUNet_raw``. MRI scans (ids > 500) are left out unless ``keep_mri``.
    ``validation_to``: where AMOS imagesVa/labelsVa go (``imagesTs`` = test set with labels, the default;
    ``imagesTr``; ``skip``). ``test_images_to``: AMOS imagesTs (no labels) are skipped or copied to
    ``imagesUnlabeled`` (extra unlabelled data for SKCDF). Written into a temporary sibling folder,
    checked (nnU-Net's integrity check unless ``verify=False``) and renamed into place when complete.
    """
    check_dataset_id_and_name(dataset_id, name)
    check_num_processes(num_processes)
    if validation_to not in VALIDATION_TO:
        raise SKCDFInputError(f"--validation-to {validation_to!r}: choose one of {', '.join(VALIDATION_TO)}.")
    if test_images_to not in TEST_IMAGES_TO:
        raise SKCDFInputError(f"--test-images-to {test_images_to!r}: choose one of {', '.join(TEST_IMAGES_TO)}.")
    root = output_root_folder(output_root)
    src = read_amos_source(source)
    plan = plan_amos(src, keep_mri, validation_to, test_images_to)
    check_amos_files(src, plan)
    if plan.count("imagesTr") == 0:
        raise SKCDFInputError("No training case is left (all MRI? use --keep-mri).")
    with staged_dataset(root, dataset_id, name, overwrite) as tmp:
        make_subfolders(tmp, sorted({d for pair in plan.placement.values() for d in pair if d is not None}))
        run_case_jobs(_jobs(plan, tmp, max(src.labels.values())), num_processes, "AMOS cases", progress)
        _write_dataset_json(tmp, name, src.labels, plan, validation_to)
        if verify:
            verify_with_nnunet(tmp, num_processes)
        target = os.path.join(root, f"Dataset{int(dataset_id):03d}_{name}")
    _print_summary(target, src, plan)
    return target


def _print_summary(target: str, src: AmosSource, plan: _Plan) -> None:
    print(f"Source: {src.folder} (dataset.json: {', '.join(f'{len(v)} {k}' for k, v in src.sets.items())})")
    print(f"Wrote {target}")
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs"), (UNLABELED_IMAGES_FOLDER, None)):
        n = plan.count(images_dir)
        if n:
            n_mri = sum(1 for c, (d, _) in plan.placement.items() if d == images_dir and plan.cases[c].is_mri)
            print(f"  {images_dir}{'/' + labels_dir if labels_dir else ''}: {n} case(s)"
                  + (f", {n_mri} of them MRI" if n_mri else ""))
    if plan.excluded_mri:
        print(f"  excluded {len(plan.excluded_mri)} MRI case(s) (ids > {CT_MAX_ID}; keep them with --keep-mri): "
              f"{format_ids(plan.excluded_mri, 20)}")
    for key, n in plan.skipped.items():
        option = "--validation-to" if key == "validation" else "--test-images-to"
        print(f"  not converted: {n} AMOS '{key}' case(s) (see {option})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skcdf_convert_amos",
        description=(
            "Convert AMOS 2022 (post-challenge release: dataset.json, imagesTr/labelsTr, imagesVa/labelsVa,\n"
            "optional imagesTs) into an nnU-Net v2 raw dataset $nnUNet_raw/Dataset<ID>_<NAME>:\n"
            "  imagesTr/amos_0001_0000.nii.gz, labelsTr/amos_0001.nii.gz, ...  (AMOS imagesTr)\n"
            "  imagesTs/, labelsTs/    AMOS imagesVa (default --validation-to imagesTs)\n"
            "  dataset.json: AMOS's 15 organs (values unchanged), channel 0 = CT.\n"
            "CT only by default: AMOS ids > 500 are MRI and are left out (listed in the summary).\n"
            "Labels must be 0..15 and lie on their image's voxel grid. The dataset is built in a hidden\n"
            "temporary folder and renamed into place only when complete and checked."
        ),
        epilog=(
            "The published DHC/SKCDF AMOS lists (train 216 / eval 24 / test 120) were drawn from AMOS imagesTr\n"
            "(train + eval) and imagesVa (test), MRI included: 60 of their 360 ids are > 500 (train 34, eval 6,\n"
            "test 20; labeled_2p 0, labeled_5p 3, labeled_10p 5, labeled_20p 6). To import them use --keep-mri\n"
            "(channel name then 'either_CT_or_MR': nnU-Net z-scores each image instead of the CT window).\n"
            "examples:\n"
            "  skcdf_convert_amos /data/amos22 -d 9 --keep-mri -np 8      # published-split parity\n"
            "  skcdf_split -d 9 --import-lists /path/to/splits/amos --ratio 2p --folds 3\n"
            "  skcdf_convert_amos /data/amos22 -d 10 -n AMOSct --validation-to imagesTr   # CT only, Va trains"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="AMOS 2022 folder (with dataset.json), or its parent holding amos22/")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id, 1..999")
    p.add_argument("-n", "--name", default="AMOS", help="dataset name (default: %(default)s)")
    p.add_argument("--keep-mri", action="store_true", help="also convert the MRI scans (AMOS ids > 500)")
    p.add_argument("--validation-to", choices=VALIDATION_TO, default="imagesTs",
                   help="where AMOS imagesVa/labelsVa go: imagesTs/labelsTs = test set (default, = published "
                        "test.txt), imagesTr = more training cases, skip")
    p.add_argument("--test-images-to", choices=TEST_IMAGES_TO, default="skip",
                   help=f"AMOS imagesTs (no labels): skip (default) or copy to {UNLABELED_IMAGES_FOLDER}/ as "
                        f"extra unlabelled images (skcdf_split --add-unlabeled-images)")
    add_output_arguments(p)
    return p


def convert_amos_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``skcdf_convert_amos``; user errors print ``ERROR: ...`` and exit with status 2."""
    args = _parser().parse_args(argv)
    with exit_on_input_error():
        convert_amos(args.source, args.dataset_id, args.name, args.keep_mri, args.validation_to,
                     args.test_images_to, args.num_processes, args.overwrite, not args.no_verify,
                     args.output_root, progress=not args.no_progress)


if __name__ == "__main__":
    convert_amos_entry()

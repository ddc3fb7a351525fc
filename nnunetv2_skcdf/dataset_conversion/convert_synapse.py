"""Synapse multi-organ CT (BTCV "Abdomen", 30 labelled cases) -> nnU-Net v2 raw dataset.

Source: the training part of the MICCAI 2015 "Multi-Atlas Labeling Beyond the Cranial Vault" data
(https://www.synapse.org/#!Synapse:syn3193805), ``img/imgXXXX.nii.gz`` + ``label/labelXXXX.nii.gz``.
Case ids are the four digits (``img0001`` -> ``0001``), the ids of the published DHC/SKCDF split lists,
so ``skcdf_split --import-lists .../synapse`` maps them without ``--id-template``.

The BTCV label values 1..13 are the classes of ``labels.py`` in the same order (``BTCV_LABELS`` below,
checked by the tests), so labels are copied unchanged.
"""
from __future__ import annotations

import argparse
import os
import re
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
from nnunetv2_skcdf.dataset_conversion.labels import synapse_labels_dict
from nnunetv2_skcdf.splits.published_lists import format_ids, read_id_list
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError, exit_on_input_error

#: The BTCV annotation's label values as published with the data (value, BTCV organ name) next to the
#: nnU-Net name of ``labels.py`` for that organ: the same classes in the same order, so values are kept.
BTCV_LABELS: Tuple[Tuple[int, str, str], ...] = (
    (1, "spleen", "spleen"),
    (2, "right kidney", "right_kidney"),
    (3, "left kidney", "left_kidney"),
    (4, "gallbladder", "gallbladder"),
    (5, "esophagus", "esophagus"),
    (6, "liver", "liver"),
    (7, "stomach", "stomach"),
    (8, "aorta", "aorta"),
    (9, "inferior vena cava", "inferior_vena_cava"),
    (10, "portal vein and splenic vein", "portal_and_splenic_veins"),
    (11, "pancreas", "pancreas"),
    (12, "right adrenal gland", "right_adrenal_gland"),
    (13, "left adrenal gland", "left_adrenal_gland"),
)
MAX_LABEL = max(value for value, _, _ in BTCV_LABELS)
#: Test cases of the published DHC/SKCDF Synapse split (``test.txt``; train 20 / eval 4 / test 6).
PUBLISHED_TEST_IDS: Tuple[str, ...] = ("0008", "0027", "0029", "0033", "0037", "0039")
#: Where ``img/`` and ``label/`` may sit below SOURCE (the BTCV archive unpacks to RawData/Training/...).
LAYOUTS: Tuple[str, ...] = ("", "Training", os.path.join("RawData", "Training"))
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
_ENDING_RE = "|".join(re.escape(e) for e in IMAGE_ENDINGS)


def btcv_label_mapping() -> Dict[int, int]:
    """BTCV label value -> label id in ``labels.py`` (looked up by organ name; the identity)."""
    ours = synapse_labels_dict()
    return {value: ours[name] for value, _, name in BTCV_LABELS}


# --------------------------------------------------------------------------------------------------
# reading the source folder
# --------------------------------------------------------------------------------------------------
def find_synapse_layout(source: str) -> str:
    """The folder below ``source`` that holds ``img/`` and ``label/`` (see ``LAYOUTS``)."""
    if not os.path.isdir(source):
        raise SKCDFInputError(f"Source folder {source} does not exist.")
    found = [rel for rel in LAYOUTS if os.path.isdir(os.path.join(source, rel, "img"))]
    if len(found) > 1:
        raise SKCDFInputError(
            f"{source} holds several BTCV image folders ({', '.join(os.path.join(r, 'img') for r in found)}). "
            f"Give the folder that directly contains the img/ and label/ you want to convert."
        )
    if not found:
        expected = "\n".join(f"  {os.path.join(source, r, 'img', 'img0001.nii.gz')} + "
                             f"{os.path.join(source, r, 'label', 'label0001.nii.gz')}" for r in LAYOUTS)
        entries = sorted(os.listdir(source))
        raise SKCDFInputError(
            f"{source} does not look like the BTCV 'Abdomen' training data. Expected one of these layouts:\n"
            f"{expected}\nFound in {source}: {', '.join(entries[:20]) or 'nothing'}"
            + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
        )
    folder = os.path.join(source, found[0])
    if not os.path.isdir(os.path.join(folder, "label")):
        raise SKCDFInputError(
            f"{os.path.join(folder, 'img')} exists but {os.path.join(folder, 'label')} does not. The training "
            f"labels (labelXXXX.nii.gz) must sit next to img/ in a folder named label/."
        )
    return folder


def _list_numbered(folder: str, prefix: str) -> Tuple[Dict[str, str], List[str]]:
    """``{'0001': path}`` of ``<prefix>XXXX<ending>`` files, and the names of other (ignored) files."""
    cases: Dict[str, str] = {}
    ignored = []
    pattern = re.compile(rf"^{prefix}(\d{{4}})({_ENDING_RE})$")
    for fname in sorted(os.listdir(folder)):
        if fname.startswith("."):
            continue
        m = pattern.match(fname)
        if m is None:
            ignored.append(fname)
            continue
        if m[1] in cases:
            raise SKCDFInputError(
                f"Case {m[1]} has two files in {folder}: {os.path.basename(cases[m[1]])} and {fname}. Keep one."
            )
        cases[m[1]] = os.path.join(folder, fname)
    return cases, ignored


def pair_synapse_cases(folder: str) -> Tuple[Dict[str, Tuple[str, str]], List[str]]:
    """``{case id: (image, label)}`` of ``folder/img`` and ``folder/label``; every image needs its label."""
    images, ignored_images = _list_numbered(os.path.join(folder, "img"), "img")
    labels, ignored_labels = _list_numbered(os.path.join(folder, "label"), "label")
    problems = [f"  case {c}: {images[c]} has no label {os.path.join(folder, 'label', f'label{c}.nii.gz')}"
                for c in sorted(set(images) - set(labels))]
    problems += [f"  case {c}: {labels[c]} has no image {os.path.join(folder, 'img', f'img{c}.nii.gz')}"
                 for c in sorted(set(labels) - set(images))]
    if problems:
        raise SKCDFInputError(
            "Images and labels do not pair up:\n" + "\n".join(problems)
            + "\nAdd the missing file (from the BTCV archive) or remove the unpaired one, then run again."
        )
    if not images:
        raise SKCDFInputError(f"No imgXXXX{FILE_ENDING} files in {os.path.join(folder, 'img')}.")
    ignored = [os.path.join("img", f) for f in ignored_images] + [os.path.join("label", f) for f in ignored_labels]
    return {c: (images[c], labels[c]) for c in sorted(images)}, ignored


def normalize_case_ids(ids: Sequence[str], source: str) -> List[str]:
    """``'8'``/``'0008'``/``'img0008'`` -> ``'0008'``; anything else is an error naming ``source``."""
    out = []
    for raw in ids:
        m = re.fullmatch(r"(?:img|label)?(\d{1,4})", raw.strip())
        if m is None:
            raise SKCDFInputError(f"{source}: {raw!r} is not a Synapse case id (expected e.g. 0008).")
        out.append(f"{int(m[1]):04d}")
    return out


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def _jobs(cases: Dict[str, Tuple[str, str]], test_ids: Sequence[str], out: str) -> List[CaseJob]:
    jobs = []
    for case_id, (image, label) in cases.items():
        images_dir, labels_dir = ("imagesTs", "labelsTs") if case_id in test_ids else ("imagesTr", "labelsTr")
        jobs.append(CaseJob(case_id, image, os.path.join(out, images_dir, f"{case_id}_0000{FILE_ENDING}"),
                            label, os.path.join(out, labels_dir, f"{case_id}{FILE_ENDING}"), MAX_LABEL))
    return jobs


def _write_dataset_json(folder: str, name: str, num_training: int, num_test: int) -> None:
    generate_dataset_json(
        folder, {0: "CT"}, synapse_labels_dict(), num_training, FILE_ENDING, dataset_name=name,
        reference="https://www.synapse.org/#!Synapse:syn3193805/wiki/217789",
        release="MICCAI 2015 Multi-Atlas Labeling Beyond the Cranial Vault, Abdomen (BTCV), training data",
        description=(
            "Synapse/BTCV multi-organ abdominal CT (13 organs), converted by nnunetv2_skcdf "
            "(skcdf_convert_synapse). Case ids are the BTCV numbers (img0001 -> 0001). "
            + (f"imagesTs/labelsTs hold the {num_test} test cases of the published DHC/SKCDF split."
               if num_test else "All labelled cases are in imagesTr/labelsTr.")
        ),
        license="see the Synapse BTCV data use terms",
        converted_by="nnunetv2_skcdf skcdf_convert_synapse",
        numTest=num_test,
    )


def convert_synapse(source: str, dataset_id: int, name: str = "Synapse", test_to_imagests: bool = False,
                    test_ids: Optional[Sequence[str]] = None, num_processes: int = 1, overwrite: bool = False,
                    verify: bool = True, output_root: Optional[str] = None, progress: bool = True) -> str:
    """Convert the BTCV training data at ``source`` into ``<output_root>/Dataset<id>_<name>``; return its path.

    ``output_root`` defaults to ``$nnUNet_raw``. With ``test_to_imagests`` the cases ``test_ids``
    (default: ``PUBLISHED_TEST_IDS``) go to imagesTs/labelsTs instead of imagesTr/labelsTr. The dataset is
    written into a temporary sibling folder, checked (also by nnU-Net's integrity check unless
    ``verify=False``) and renamed into place only when complete. Raises ``SKCDFInputError`` on bad input.
    """
    check_dataset_id_and_name(dataset_id, name)
    check_num_processes(num_processes)
    if any(value != label_id for value, label_id in btcv_label_mapping().items()):
        raise RuntimeError("BTCV_LABELS and labels.SYNAPSE_CLASSES disagree: labels would need remapping.")
    if test_ids is not None and not test_to_imagests:
        raise SKCDFInputError("A test list only has an effect with --test-to-imagesTs (test_to_imagests=True).")
    root = output_root_folder(output_root)
    folder = find_synapse_layout(os.path.abspath(source))
    cases, ignored = pair_synapse_cases(folder)
    tests = normalize_case_ids(test_ids if test_ids is not None else PUBLISHED_TEST_IDS, "test list")
    tests = sorted(set(tests)) if test_to_imagests else []
    missing = sorted(set(tests) - set(cases))
    if missing:
        raise SKCDFInputError(
            f"Test case(s) {', '.join(missing)} are not in {folder} (found {format_ids(cases)}). Convert the "
            f"complete BTCV training set, or give your own test ids with --test-list."
        )
    if len(tests) == len(cases):
        raise SKCDFInputError("Every case would be a test case: imagesTr would be empty. Check the test list.")
    with staged_dataset(root, dataset_id, name, overwrite) as tmp:
        make_subfolders(tmp, ["imagesTr", "labelsTr"] + (["imagesTs", "labelsTs"] if tests else []))
        run_case_jobs(_jobs(cases, tests, tmp), num_processes, "Synapse cases", progress)
        _write_dataset_json(tmp, name, len(cases) - len(tests), len(tests))
        if verify:
            verify_with_nnunet(tmp, num_processes)
        target = os.path.join(root, f"Dataset{int(dataset_id):03d}_{name}")
    _print_summary(target, source, folder, len(cases) - len(tests), tests, ignored)
    return target


def _print_summary(target: str, source: str, folder: str, n_train: int, tests: Sequence[str],
                   ignored: Sequence[str]) -> None:
    rel = os.path.relpath(folder, os.path.abspath(source))
    layout = "img/ + label/" if rel == "." else f"{os.path.join(rel, 'img')}/ + {os.path.join(rel, 'label')}/"
    print(f"Source layout: {layout} in {source}")
    print(f"Wrote {target}")
    print(f"  imagesTr/labelsTr: {n_train} case(s)")
    if tests:
        print(f"  imagesTs/labelsTs: {len(tests)} test case(s): {', '.join(tests)}")
    if ignored:
        print(f"  ignored {len(ignored)} file(s) not named imgXXXX/labelXXXX: {format_ids(ignored, 10)}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skcdf_convert_synapse",
        description=(
            "Convert the Synapse multi-organ CT data (BTCV 'Abdomen' training set, 30 labelled CT) into an\n"
            "nnU-Net v2 raw dataset $nnUNet_raw/Dataset<ID>_<NAME>:\n"
            "  imagesTr/0001_0000.nii.gz, labelsTr/0001.nii.gz, ...   (case id = the BTCV number)\n"
            "  imagesTs/, labelsTs/                                   (with --test-to-imagesTs)\n"
            "  dataset.json: channel 0 = CT, the 13 organs (BTCV values 1..13 unchanged).\n"
            "SOURCE may hold img/ + label/ directly or as Training/img or RawData/Training/img.\n"
            "Labels must be 0..13 and lie on their image's voxel grid. The dataset is built in a hidden\n"
            "temporary folder and renamed into place only when complete and checked."
        ),
        epilog=(
            "examples:\n"
            "  skcdf_convert_synapse /data/Abdomen -d 8 --test-to-imagesTs -np 4\n"
            "  skcdf_split -d 8 --import-lists /path/to/splits/synapse --ratio 20p --folds 3\n"
            f"Default test cases (published DHC/SKCDF Synapse split, test.txt): {' '.join(PUBLISHED_TEST_IDS)}."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="BTCV training data folder (see above)")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id, 1..999")
    p.add_argument("-n", "--name", default="Synapse", help="dataset name (default: %(default)s)")
    p.add_argument("--test-to-imagesTs", action="store_true",
                   help="put the test cases into imagesTs/labelsTs instead of imagesTr/labelsTr")
    p.add_argument("--test-list", default=None, metavar="PATH",
                   help="file with the test case ids, one per line (e.g. the published splits/synapse/test.txt); "
                        "default: the 6 published test ids")
    add_output_arguments(p)
    return p


def convert_synapse_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``skcdf_convert_synapse``; user errors print ``ERROR: ...`` and exit with status 2."""
    args = _parser().parse_args(argv)
    with exit_on_input_error():
        test_ids = None
        if args.test_list is not None:
            if not os.path.isfile(args.test_list):
                raise SKCDFInputError(f"--test-list {args.test_list} does not exist.")
            test_ids = read_id_list(args.test_list)
        convert_synapse(args.source, args.dataset_id, args.name, args.test_to_imagesTs, test_ids,
                        args.num_processes, args.overwrite, not args.no_verify, args.output_root,
                        progress=not args.no_progress)


if __name__ == "__main__":
    convert_synapse_entry()

"""What the public-dataset converters (Synapse/BTCV, AMOS) share: per-case checks and copying, the
staged (all-or-nothing) dataset folder, and nnU-Net's integrity check.

One case = one image (one channel) and, for labelled cases, one label map. ``convert_case`` checks it
and writes it in nnU-Net's naming; it returns a problem description instead of raising, so that a
conversion reports every broken case at once (``run_case_jobs``). Images that already are ``.nii.gz``
are copied byte for byte (no recompression, the header stays exactly as published); labels are
rewritten only when they must change (not uint8, geometry noise, not ``.nii.gz``).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunetv2_skcdf.dataset_conversion.phantom import _check_target, _swap_in
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError, SKCDFWriteError, _env_folder
from nnunetv2_skcdf.utilities.io import _DISK_FULL, write_error_message
from nnunetv2_skcdf.utilities.parallel import imap_with_progress

FILE_ENDING = ".nii.gz"
#: Image/label geometry tolerances. Differences below them are header rounding noise (the label is then
#: written with the image's geometry, so nnU-Net sees identical grids); above them the case is rejected.
SPACING_RTOL = 1e-4  # relative, per axis
ORIGIN_ATOL_MM = 1e-3  # mm, per axis (plus SPACING_RTOL x origin for large coordinates)
DIRECTION_ATOL = 1e-4  # direction cosines
#: How many per-case problems an error message lists before it says "... and N more".
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class CaseJob:
    """One case to check and write. ``label_src``/``label_dst`` are ``None`` for image-only cases."""

    case_id: str
    image_src: str
    image_dst: str
    label_src: Optional[str] = None
    label_dst: Optional[str] = None
    max_label: int = 0  # highest valid label value (0 = background)


@dataclass(frozen=True)
class Geometry:
    """Header geometry in SimpleITK order (x, y, z): size in voxels, spacing and origin in mm."""

    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]


# --------------------------------------------------------------------------------------------------
# options and the staged output folder
# --------------------------------------------------------------------------------------------------
def check_dataset_id_and_name(dataset_id: int, name: str) -> None:
    if not 1 <= int(dataset_id) <= 999:
        raise SKCDFInputError(f"Dataset id {dataset_id} is out of range: nnU-Net ids are 1..999 (option -d).")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise SKCDFInputError(f"Dataset name {name!r}: use letters, digits, '_' and '-' only (option -n).")


def output_root_folder(output_root: Optional[str]) -> str:
    """``output_root`` or ``$nnUNet_raw`` (absolute)."""
    return os.path.abspath(output_root if output_root is not None else _env_folder("nnUNet_raw"))


@contextmanager
def staged_dataset(root: str, dataset_id: int, name: str, overwrite: bool) -> Iterator[str]:
    """Yield a hidden temporary sibling folder to fill; on success rename it to ``root/DatasetNNN_name``.

    An existing target (or another dataset with the same id) is refused unless ``overwrite``; with
    ``overwrite`` the old folder is replaced only once the new one is complete. On any error the
    temporary folder is deleted, so a failed conversion leaves nothing behind.
    """
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    target = _check_target(root, folder_name, dataset_id, overwrite)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp_{folder_name}_", dir=root)
    try:
        yield tmp
        _check_target(root, folder_name, dataset_id, overwrite)  # nobody created it meanwhile
        _swap_in(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------------
def read_geometry(path: str) -> Geometry:
    """Header only (no pixel data): fast even for large CT volumes."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return Geometry(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                    tuple(reader.GetDirection()))


def geometry_problem(image: Geometry, label: Geometry) -> Optional[str]:
    """Why the label does not lie on the image's voxel grid, or ``None`` when it does (within tolerance)."""
    if image.size != label.size:
        return f"size (x, y, z voxels) image {image.size} != label {label.size}"
    if not np.allclose(label.spacing, image.spacing, rtol=SPACING_RTOL, atol=0):
        return f"spacing (mm) image {_fmt(image.spacing)} != label {_fmt(label.spacing)}"
    if not np.allclose(label.origin, image.origin, rtol=SPACING_RTOL, atol=ORIGIN_ATOL_MM):
        return f"origin (mm) image {_fmt(image.origin)} != label {_fmt(label.origin)}"
    if not np.allclose(label.direction, image.direction, rtol=0, atol=DIRECTION_ATOL):
        return f"direction image {_fmt(image.direction)} != label {_fmt(label.direction)}"
    return None


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def label_value_problem(values: np.ndarray, max_label: int) -> Optional[str]:
    """Why ``values`` (a label array) is not made of the integers 0..max_label, or ``None``."""
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        bad = np.unique(values[values != np.round(values)])[:10]
        return f"non-integer label values {', '.join(f'{v:g}' for v in bad)}"
    lo, hi = values.min(), values.max()
    if lo < 0 or hi > max_label:
        found = np.unique(values)
        bad = found[(found < 0) | (found > max_label)]
        return (f"label values {', '.join(f'{v:g}' for v in bad[:10])} outside 0..{max_label} "
                f"(values present: {', '.join(f'{v:g}' for v in found[:30])})")
    return None


def _written(dst: str, write: Callable[[], None], src: Optional[str] = None) -> Optional[str]:
    """Run ``write`` (which writes ``dst``); a failure to read ``src`` is returned as the case's problem, a failure
    to write (full disk, permissions) raises ``SKCDFWriteError`` naming ``dst`` and the free space on its disk."""
    try:
        write()
    except OSError as e:
        # shutil.copyfile names both files on an error of its copy loop (filename = src, filename2 = dst, a full disk
        # included); only an error about src alone (opening or reading it) is the source's problem
        if src is not None and e.filename == src and e.filename2 is None and e.errno not in _DISK_FULL:
            return f"cannot read {src}: {e.strerror or e}"
        raise SKCDFWriteError(write_error_message(dst, e)) from e
    except RuntimeError as e:  # SimpleITK's writer
        raise SKCDFWriteError(write_error_message(dst, e)) from e
    return None


def _copy_or_convert_image(src: str, dst: str) -> Optional[str]:
    """The image written as ``dst`` (a byte copy of a .nii.gz; else read and written as .nii.gz); a problem of the
    source is returned, a failed write raised (``_written``)."""
    if src.endswith(FILE_ENDING):
        return _written(dst, lambda: shutil.copyfile(src, dst), src)
    try:
        image = sitk.ReadImage(src)
    except RuntimeError as e:
        return f"cannot read image {src}: {str(e).strip().splitlines()[-1]}"
    return _written(dst, lambda: sitk.WriteImage(image, dst, True))


def convert_case(job: CaseJob) -> Tuple[str, Optional[str]]:
    """Check and write one case; return ``(case_id, problem or None)``. Top-level for worker processes."""
    try:
        image_geometry = read_geometry(job.image_src)
    except RuntimeError as e:
        return job.case_id, f"cannot read image {job.image_src}: {str(e).strip().splitlines()[-1]}"
    if job.label_src is not None:
        try:
            label = sitk.ReadImage(job.label_src)
        except RuntimeError as e:
            return job.case_id, f"cannot read label {job.label_src}: {str(e).strip().splitlines()[-1]}"
        label_geometry = Geometry(tuple(label.GetSize()), tuple(label.GetSpacing()), tuple(label.GetOrigin()),
                                  tuple(label.GetDirection()))
        problem = geometry_problem(image_geometry, label_geometry)
        if problem is not None:
            return job.case_id, f"image {job.image_src} and label {job.label_src} do not match: {problem}"
        if label.GetNumberOfComponentsPerPixel() != 1:
            return job.case_id, f"label {job.label_src} has {label.GetNumberOfComponentsPerPixel()} components per voxel"
        problem = label_value_problem(sitk.GetArrayViewFromImage(label), job.max_label)
        if problem is not None:
            return job.case_id, f"label {job.label_src}: {problem}"
        problem = _written(job.label_dst, lambda: _write_label(label, label_geometry == image_geometry, job),
                           job.label_src)
        if problem is not None:
            return job.case_id, problem
    return job.case_id, _copy_or_convert_image(job.image_src, job.image_dst)


def _write_label(label: sitk.Image, same_geometry: bool, job: CaseJob) -> None:
    """Byte copy when nothing changes; otherwise uint8 with the image's exact geometry."""
    if same_geometry and label.GetPixelID() == sitk.sitkUInt8 and job.label_src.endswith(FILE_ENDING):
        shutil.copyfile(job.label_src, job.label_dst)
        return
    out = sitk.Cast(label, sitk.sitkUInt8)
    if not same_geometry:  # within tolerance (checked above): use the image's header values
        reader = sitk.ImageFileReader()
        reader.SetFileName(job.image_src)
        reader.ReadImageInformation()
        out.SetSpacing(reader.GetSpacing())
        out.SetOrigin(reader.GetOrigin())
        out.SetDirection(reader.GetDirection())
    sitk.WriteImage(out, job.label_dst, True)


def run_case_jobs(jobs: Sequence[CaseJob], num_processes: int, desc: str, progress: bool = True) -> None:
    """Convert every case (``num_processes`` workers); raise one error that lists every broken case."""
    problems: List[Tuple[str, str]] = []
    for case_id, problem in imap_with_progress(convert_case, list(jobs), num_processes, desc, progress):
        if problem is not None:
            problems.append((case_id, problem))
    if problems:
        problems.sort()
        shown = "\n".join(f"  case {c}: {p}" for c, p in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise SKCDFInputError(
            f"{len(problems)} case(s) cannot be converted (nothing was written):\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix or remove these files in the source folder and run the conversion again."
        )


def check_num_processes(num_processes: int) -> None:
    if num_processes < 1:
        raise SKCDFInputError(f"-np {num_processes}: need at least one process.")


def verify_with_nnunet(folder: str, num_processes: int) -> None:
    """nnU-Net's own ``verify_dataset_integrity`` (imagesTr/labelsTr); its failures become input errors."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    try:
        verify_dataset_integrity(folder, num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError) as e:
        raise SKCDFInputError(
            f"nnU-Net's integrity check failed on the converted data (nothing was written): {e}\n"
            f"Pass --no-verify to skip it (not recommended)."
        ) from None


def make_subfolders(folder: str, names: Sequence[str]) -> None:
    for name in names:
        os.makedirs(os.path.join(folder, name), exist_ok=True)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """The converters' shared options: output root, processes, overwrite, integrity check, progress bar."""
    p.add_argument("-o", "--output-root", default=None, help="folder that receives Dataset<ID>_<NAME> "
                                                            "(default: $nnUNet_raw)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--no-verify", action="store_true", help="skip nnU-Net's verify_dataset_integrity")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

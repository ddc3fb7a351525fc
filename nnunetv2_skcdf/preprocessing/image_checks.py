"""Checks of one raw image file that nnU-Net's readers do not make, for ``imagesUnlabeled``.

A wrong labelled image shows up in its label overlap; a wrong unlabelled image has no label, so nothing downstream
would notice it. Each check raises ``SKCDFInputError`` naming the file and the fix:

- ``check_file_complete``: empty and truncated files (SimpleITK reads a truncated ``.nii.gz`` without an error;
  also used by ``skcdf_evaluate`` for predictions and references);
- ``check_one_image_per_file``: 4D and multi-component (vector, RGB) images, which nnU-Net's reader takes for several
  channels (its normalisation then fails with an ``IndexError``);
- ``check_finite_on_disk``: NaN/inf voxels in NIfTI files, which SimpleITK 2.5 reads as 0, so that a check of the
  array nnU-Net's reader returns cannot see them;
- ``check_orientation``: axes flipped or permuted relative to the training images. nnU-Net does not reorient (unless
  the plans name a reorienting reader), so the network would see such an image's anatomy mirrored or transposed
  relative to its labelled data.

Headers are read with SimpleITK's ``ImageFileReader.ReadImageInformation`` (no voxel data), whatever reader the
plans use: the geometry in the header is the same, and a format SimpleITK cannot read (``None``) is left to nnU-Net's
reader, whose failure is reported with the file.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_skcdf.utilities.dataset_files import UNLABELED_IMAGES_FOLDER, SKCDFInputError, format_numbers

#: letter of the patient side an array axis points to, per physical axis of SimpleITK's LPS space (+, -)
_SIDES = (("L", "R"), ("P", "A"), ("S", "I"))


class Header(NamedTuple):
    """What SimpleITK's header read gives: sizes in SimpleITK's x, y, z(, t) order."""
    size: Tuple[int, ...]
    components: int
    direction: Tuple[float, ...]


class Orientation(NamedTuple):
    code: str                      # e.g. 'LPS': the side each array axis (x, y, z) points to
    direction: Tuple[float, ...]   # the direction cosines (row-major, SimpleITK's order)
    file: str                      # a file with this orientation, for messages


def read_header(path: str) -> Optional[Header]:
    """The file's header, or ``None`` when SimpleITK cannot read it (then nnU-Net's reader is the judge)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return Header(tuple(reader.GetSize()), reader.GetNumberOfComponents(), tuple(reader.GetDirection()))


# ----------------------------------------------------------------------------------------------- file content
def check_file_complete(path: str, fix: Optional[str] = None) -> None:
    """Refuse empty and truncated files that readers accept silently (or fail on with a traceback).

    SimpleITK reads a truncated ``.nii.gz`` without an error and fills the missing voxels with garbage (seen
    with SimpleITK 2.5), so gzip streams are decompressed once to their end-of-stream marker (CRC checked), and
    an uncompressed ``.nii`` must be as long as its header says. A zero-byte file of any format is refused (gzip reads
    it as empty data, SimpleITK fails with a traceback). ``fix``: what the user should do (default: for an image of
    ``imagesUnlabeled``; ``skcdf_evaluate`` names its own for predictions and references).
    """
    problem = None
    try:
        size = os.path.getsize(path)
    except OSError as e:
        size, problem = None, f"{type(e).__name__}: {e.strerror}"
    if size == 0:
        problem = "the file is empty, 0 bytes"
    elif problem is None and path.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        except (EOFError, OSError, zlib.error) as e:
            problem = f"{type(e).__name__}: {e}"
    elif problem is None and path.endswith(".nii"):
        import nibabel

        try:
            header = nibabel.load(path).header
            needed = int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
            if size < needed:
                problem = f"{size} bytes on disk, the header needs {needed}"
        except Exception as e:  # noqa: BLE001 - an unparsable header is the same user problem
            problem = f"{type(e).__name__}: {e}"
    if problem:
        fix = fix or f"re-export it or remove the case from {UNLABELED_IMAGES_FOLDER}/"
        raise SKCDFInputError(f"{path}: cannot be read ({problem}). The file is truncated or corrupt; {fix}.")


def check_one_image_per_file(path: str, header: Optional[Header]) -> None:
    """nnU-Net wants one scalar 2D/3D image per channel file; a 4D series or a vector image would become channels."""
    if header is None:
        return
    split = ("Save each volume as a file of its own, one file per channel (<case>_0000, <case>_0001, ... as "
             "dataset.json's channel_names lists them), or keep only the volume you mean.")
    if len(header.size) > 3 and int(np.prod(header.size[3:])) > 1:
        axes = "x, y, z, t" if len(header.size) == 4 else "x, y, z, ..."
        raise SKCDFInputError(f"{path}: is a {len(header.size)}D image (size {axes} = "
                              f"{', '.join(map(str, header.size))}); nnU-Net reads one 3D image per file. {split}")
    if header.components > 1:
        raise SKCDFInputError(f"{path}: has {header.components} components per voxel (a vector or RGB image); nnU-Net "
                              f"reads one value per voxel and file. {split}")


def check_finite_on_disk(path: str) -> None:
    """NaN/inf voxels of a float NIfTI file, read with nibabel, which returns the stored values (SimpleITK 2.5 returns
    0 for them). Integer data cannot hold NaN/inf and is not read. Other formats are checked on the array nnU-Net's
    reader returns (``read_unlabeled_case``), which keeps NaN for nrrd and mha."""
    if not path.endswith((".nii", ".nii.gz")):
        return
    import nibabel

    image = nibabel.load(path)
    dtype = image.get_data_dtype()
    if dtype.kind not in "fc":
        return
    data = np.asanyarray(image.dataobj)
    n_nan, n_inf = int(np.count_nonzero(np.isnan(data))), int(np.count_nonzero(np.isinf(data)))
    if n_nan or n_inf:
        raise SKCDFInputError(f"{path}: contains NaN or infinite voxels ({n_nan} NaN, {n_inf} inf in its {dtype} data; "
                              f"SimpleITK reads them as 0). Replace them (e.g. by the background intensity) or remove "
                              f"the case.")


# ------------------------------------------------------------------------------------------------ orientation
def orientation_code(direction: Sequence[float]) -> str:
    """The side each array axis points to, e.g. ``'LPS'`` for the identity (SimpleITK's LPS space; the convention of
    ``sitk.DICOMOrientImageFilter``). Works for 2D (``'LP'``) too. Slightly oblique axes get the closest side."""
    n = int(round(len(direction) ** 0.5))
    matrix = np.asarray(direction, dtype=np.float64).reshape(n, n)
    code = ""
    for axis in range(n):  # column = where array axis ``axis`` points in physical space
        physical = int(np.argmax(np.abs(matrix[:, axis])))
        code += _SIDES[physical][0 if matrix[physical, axis] > 0 else 1]
    return code


def read_orientation(path: str) -> Optional[Orientation]:
    header = read_header(path)
    if header is None or len(header.size) > 3:
        return None
    return Orientation(orientation_code(header.direction), header.direction, path)


def reader_reorients(reader_class: type) -> bool:
    """nnU-Net's ``*WithReorient`` readers bring every image to one orientation: nothing to check then."""
    return "reorient" in reader_class.__name__.lower()


def training_orientations(first_channel_files: Iterable[str]) -> Dict[str, Orientation]:
    """Orientation code -> the first training image with it (usually one code for the whole dataset)."""
    found: Dict[str, Orientation] = {}
    for path in first_channel_files:
        orientation = read_orientation(path)
        if orientation is not None:
            found.setdefault(orientation.code, orientation)
    return found


def check_orientation(path: str, header: Optional[Header], training: Optional[Dict[str, Orientation]]) -> None:
    """Refuse an image whose axes point elsewhere than in every training image (a flip or a permutation; small
    obliqueness does not change the code and is accepted, as nnU-Net accepts it among the training images)."""
    if header is None or not training or len(header.size) > 3:
        return
    code = orientation_code(header.direction)
    if code in training or all(len(code) != len(c) for c in training):  # 2D vs 3D: check_dimensionality's message
        return
    examples = "; ".join(f"{os.path.basename(o.file)}: direction {format_numbers(o.direction)}"
                         for o in training.values())
    target = next(iter(training))
    how = (f"sitk.DICOMOrient(image, '{target}')" if len(target) == 3 else f"flip/transpose it to {target}")
    raise SKCDFInputError(
        f"{path}: orientation {code} (direction {format_numbers(header.direction)}) differs from the training images "
        f"in imagesTr ({', '.join(training)}, e.g. {examples}). nnU-Net does not reorient images, so the network "
        f"would see this anatomy flipped or with permuted axes relative to its labelled data. Reorient the image "
        f"(SimpleITK: {how}), check it, or remove the case from {UNLABELED_IMAGES_FOLDER}/.")

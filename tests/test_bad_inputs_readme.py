"""Issue 42, item 5: README's Troubleshooting table has a row for each refusal added for the issue and for the two
stock nnU-Net pitfalls on the documented path (we do not patch nnU-Net)."""
from __future__ import annotations

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _troubleshooting_rows() -> list:
    text = README.read_text()
    section = text[text.index("\n## Troubleshooting\n"):]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| message")]


@pytest.mark.parametrize("message, fix", [
    # the two nnU-Net pitfalls
    ("Background workers died", "<case>_0000.nii.gz"),
    ("FileNotFoundError: ... <...>/SKCDFTrainer__nnUNetPlans__CFG/dataset.json", "pass the `-tr`, `-p` and `-c`"),
    # the refusals of issue 42 (their messages are asserted in test_bad_inputs_disk, test_unlabeled_preprocessing,
    # test_evaluate and test_trainer_bad_inputs)
    ("cannot be written, out of disk space (OSError: [Errno 28] No space left on device); N MiB free on its disk",
     "free disk space"),
    ("so --overwrite replaced nothing: <folder> is as it was", "rerun with `--overwrite`"),
    ("is a folder, but skcdf_preprocess_unlabeled must write a file of unlabelled case", "move or rename the folder"),
    ("but preprocess differently", "its own `data_identifier`"),
    ("is a 3D image with a single slice (size x, y, z = X, Y, 1), which nnU-Net reads as 2D", "export the whole volume"),
    ("the file is empty, 0 bytes", "predict the case again"),
    ("ERROR: SKCDFTrainer refused to start: <message>", "the row of `<message>`"),
])
def test_troubleshooting_row(message, fix):
    rows = [row for row in _troubleshooting_rows() if message in row]
    assert rows, f"no Troubleshooting row for {message!r}"
    assert any(fix in row for row in rows), rows

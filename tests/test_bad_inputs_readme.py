"""Issue 42, item 5: the Troubleshooting table (documentation/troubleshooting.md, moved out of README.md by issue 41) has a row for each refusal added for the issue and for the two
stock nnU-Net pitfalls on the documented path (we do not patch nnU-Net)."""
from __future__ import annotations

from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "documentation" / "troubleshooting.md"


def _troubleshooting_rows() -> list:
    section = PAGE.read_text()
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
    # refusals that were tracebacks or late failures (test_pseudolabel, test_evaluate, test_splits, test_phantom,
    # test_cpu_configuration)
    ("exists and was not written by skcdf_evaluate", "add `-o OUT_FOLDER`"),
    ("is not valid JSON", "fix the file"),
    ("Dataset id N is already used by", "remove the leftover folder"),
    ("fold 'all' trained on every case with a label file", "-f 0 1 2"),
    ("has no image ...", "make the split again"),
    ("is one of the plans' own", "pick another `--name`"),
])
def test_troubleshooting_row(message, fix):
    rows = [row for row in _troubleshooting_rows() if message in row]
    assert rows, f"no Troubleshooting row for {message!r}"
    assert any(fix in row for row in rows), rows

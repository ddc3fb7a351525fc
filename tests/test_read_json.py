"""``utilities.io.read_json``: the one reader behind every JSON input of the package (dataset.json, splits, plans,
summaries, round records). A missing, unreadable or malformed file is refused naming the file, the fault and the fix;
the commands that use it keep their own fix text."""
from __future__ import annotations

import json
import os

import pytest

from nnunetv2_skcdf.evaluation.dice_table import dice_table_entry
from nnunetv2_skcdf.splits.semi_supervised_splits import MAKE_ONE_HINT, load_semi_supervised_fold
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError
from nnunetv2_skcdf.utilities.io import read_json


def test_valid_file_returns_its_value(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"train": ["x"], "val": []}]))
    assert read_json(str(path), "fix") == [{"train": ["x"], "val": []}]


def test_missing_file_names_the_path_why_and_the_fix(tmp_path):
    path = tmp_path / "nothing.json"
    with pytest.raises(SKCDFInputError) as e:
        read_json(str(path), "Make it first.", "the command needs it")
    assert str(e.value) == f"{path} does not exist: the command needs it. Make it first."
    with pytest.raises(SKCDFInputError, match=r"nothing\.json does not exist\. Make it first\.$"):
        read_json(str(path), "Make it first.")


def test_malformed_file_names_the_json_error_and_the_fix(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"labels": {"background": 0,}}')
    with pytest.raises(SKCDFInputError) as e:
        read_json(str(path), "Fix the file.")
    message = str(e.value)
    assert message.startswith(f"{path} is not valid JSON (Expecting property name")
    assert "line 1 column" in message and message.endswith("Fix the file.")


@pytest.mark.parametrize("content", ["folder", b"\xff\xfe\x00not utf-8"])
def test_unreadable_file_names_the_os_error(tmp_path, content):
    path = tmp_path / "x.json"
    if content == "folder":
        path.mkdir()  # IsADirectoryError: an OSError that is not "missing"
    else:
        path.write_bytes(content)
    with pytest.raises(SKCDFInputError, match=r"x\.json cannot be read \(.+\)\. Fix it\.$"):
        read_json(str(path), "Fix it.")


def test_split_reader_keeps_its_hint(tmp_path):
    with pytest.raises(SKCDFInputError) as e:
        load_semi_supervised_fold(str(tmp_path), 0)
    assert "splits_final.json does not exist: semi-supervised training needs it." in str(e.value)
    assert str(e.value).endswith(MAKE_ONE_HINT)
    (tmp_path / "splits_final.json").write_text("[{")
    with pytest.raises(SKCDFInputError, match="splits_final.json is not valid JSON"):
        load_semi_supervised_fold(str(tmp_path), 0)


def test_dice_table_command_refuses_a_truncated_summary(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    summary.write_text('{"mean": {"1": {"Dice": 0.5}')
    with pytest.raises(SystemExit) as e:
        dice_table_entry([str(summary)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert f"{summary} is not valid JSON (" in err and "nnUNetv2_evaluate_folder or skcdf_evaluate wrote." in err
    assert "Traceback" not in err and os.path.isfile(summary)

"""Tests of the semi-supervised split tool ``skcdf_split`` (fake raw datasets: the tool only lists files)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import pytest

from nnunetv2_skcdf.splits import semi_supervised_splits as sss
from nnunetv2_skcdf.splits.published_lists import (
    IdMapper,
    normalize_ratio,
    read_published_lists,
)
from nnunetv2_skcdf.splits.semi_supervised_splits import (
    compute_semi_supervised_splits,
    load_semi_supervised_fold,
    make_semi_supervised_splits,
    parse_amount,
    validate_splits,
)
from nnunetv2_skcdf.utilities import io as skcdf_io
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError, SKCDFWriteError

SHARED_SPLITS = Path(__file__).resolve().parents[1].parent / "shared" / "splits"
ENDING = ".nii.gz"


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Path]:
    """nnU-Net's three folders in tmp_path (nnU-Net reads the variables lazily)."""
    folders = {name: tmp_path / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for name, folder in folders.items():
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    return folders


def make_dataset(env: Dict[str, Path], train_ids: Iterable[str], unlabeled_ids: Iterable[str] = (),
                 name: str = "Dataset901_Fake") -> Path:
    """A raw dataset of empty files: imagesTr + labelsTr for ``train_ids``, imagesUnlabeled for the rest."""
    raw = env["nnUNet_raw"] / name
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    train_ids = list(train_ids)
    for case in train_ids:
        (raw / "imagesTr" / f"{case}_0000{ENDING}").touch()
        (raw / "labelsTr" / f"{case}{ENDING}").touch()
    unlabeled_ids = list(unlabeled_ids)
    if unlabeled_ids:
        (raw / "imagesUnlabeled").mkdir()
        for case in unlabeled_ids:
            (raw / "imagesUnlabeled" / f"{case}_0000{ENDING}").touch()
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
                    "numTraining": len(train_ids), "file_ending": ENDING}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    return raw


def case_ids(n: int, prefix: str = "case_") -> List[str]:
    return [f"{prefix}{i:03d}" for i in range(n)]


def splits_path(env: Dict[str, Path], name: str = "Dataset901_Fake") -> Path:
    return env["nnUNet_preprocessed"] / name / "splits_final.json"


def nnunet_do_split_read(preprocessed_base: Path, fold: int):
    """What nnUNetTrainer.do_split does with an existing splits_final.json (no preprocessed data needed)."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json

    splits = load_json(join(str(preprocessed_base), "splits_final.json"))
    return splits[fold]["train"], splits[fold]["val"]


def write_lists(folder: Path, ratio: str, labeled: Sequence[str], unlabeled: Sequence[str], val: Sequence[str],
                test: Sequence[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"labeled_{ratio}.txt").write_text("\n".join(labeled) + "\n")
    (folder / f"unlabeled_{ratio}.txt").write_text("\n".join(unlabeled) + "\n")
    (folder / "eval.txt").write_text("\n".join(val) + "\n")
    if test is not None:
        (folder / "test.txt").write_text("\n".join(test) + "\n")
    return folder


def ids_of_list_folder(folder: Path) -> List[str]:
    ids = set()
    for f in folder.glob("*.txt"):
        ids |= {line.strip() for line in f.read_text().splitlines() if line.strip()}
    return sorted(ids)


def shared(name: str) -> Path:
    folder = SHARED_SPLITS / name
    if not folder.is_dir():
        pytest.skip(f"published split lists not found at {folder}")
    return folder


def assert_partition(fold: Dict[str, List[str]], training: Iterable[str], extra_unlabeled: Iterable[str] = ()):
    roles = [set(fold["train"]), set(fold["val"]), set(fold["unlabeled"])]
    assert sum(map(len, roles)) == len(set().union(*roles)), "a case has two roles"
    assert set().union(*roles) == set(training) | set(extra_unlabeled)


# ------------------------------------------------------------------------------------------------
# mode (a): random labelled subset
# ------------------------------------------------------------------------------------------------
def test_labeled_fraction_and_default_val(env):
    train = case_ids(20)
    make_dataset(env, train)
    folds = make_semi_supervised_splits(901, labeled=0.25)
    assert len(folds) == 1
    fold = folds[0]
    assert len(fold["val"]) == 4  # 0.2 of 20
    assert len(fold["train"]) == 4  # 0.25 of the 16 left
    assert len(fold["unlabeled"]) == 12
    assert_partition(fold, train)
    assert json.loads(splits_path(env).read_text()) == folds


def test_labeled_count_val_count_and_string_amounts(env):
    train = case_ids(12)
    make_dataset(env, train)
    fold = make_semi_supervised_splits(901, labeled="3", val="2")[0]
    assert (len(fold["train"]), len(fold["val"]), len(fold["unlabeled"])) == (3, 2, 7)
    assert_partition(fold, train)


def test_val_ids_explicit_and_labeled_all(env):
    train = case_ids(6)
    make_dataset(env, train)
    fold = make_semi_supervised_splits(901, labeled="all", val_ids=["case_001", "case_004"])[0]
    assert fold == {"train": ["case_000", "case_002", "case_003", "case_005"], "val": ["case_001", "case_004"],
                    "unlabeled": []}


def test_no_mode_labels_all_non_val_cases(env):
    train = case_ids(10)
    make_dataset(env, train)
    fold = make_semi_supervised_splits(901)[0]
    assert len(fold["val"]) == 2 and len(fold["train"]) == 8 and fold["unlabeled"] == []


def test_val_fraction_keeps_at_least_one_case():
    fold = compute_semi_supervised_splits(["a", "b"], val=0.2).folds[0]
    assert len(fold["val"]) == 1 and len(fold["train"]) == 1
    fold = compute_semi_supervised_splits(["a"], val=0.2).folds[0]  # one case: nothing to validate on
    assert fold == {"train": ["a"], "val": [], "unlabeled": []}


def test_rounding_is_half_up():
    fold = compute_semi_supervised_splits(case_ids(10), labeled=0.5, val_ids=["case_000", "case_001", "case_002",
                                                                              "case_003", "case_004"]).folds[0]
    assert len(fold["train"]) == 3  # 2.5 -> 3, not Python's banker's 2


def test_deterministic_for_a_seed_and_different_across_seeds():
    ids = case_ids(40)
    a = compute_semi_supervised_splits(ids, labeled=0.2, seed=7).folds
    b = compute_semi_supervised_splits(list(reversed(ids)), labeled=0.2, seed=7).folds
    c = compute_semi_supervised_splits(ids, labeled=0.2, seed=8).folds
    assert a == b
    assert a != c


def test_deterministic_across_processes(env):
    make_dataset(env, case_ids(30))
    folds = make_semi_supervised_splits(901, labeled=0.3)
    code = ("from nnunetv2_skcdf.splits.semi_supervised_splits import compute_semi_supervised_splits as c; "
            "import json; print(json.dumps(c([f'case_{i:03d}' for i in range(30)], labeled=0.3).folds))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == folds


def test_repeat_folds_are_identical_copies():
    folds = compute_semi_supervised_splits(case_ids(30), labeled=0.2, folds=3, fold_mode="repeat").folds
    assert len(folds) == 3 and folds[0] == folds[1] == folds[2]
    folds[0]["train"].append("x")  # copies, not the same list three times
    assert "x" not in folds[1]["train"]


def test_resample_folds_draw_new_labelled_sets_with_fixed_val():
    ids = case_ids(30)
    folds = compute_semi_supervised_splits(ids, labeled=0.2, folds=3, fold_mode="resample", seed=100).folds
    assert folds[0]["val"] == folds[1]["val"] == folds[2]["val"]
    assert len({tuple(f["train"]) for f in folds}) == 3
    for i, fold in enumerate(folds):
        assert_partition(fold, ids)
        # fold i uses seed + i for its labelled draw (val always drawn with the base seed)
        single = compute_semi_supervised_splits(ids, labeled=0.2, val_ids=fold["val"], seed=100 + i).folds[0]
        assert single["train"] == fold["train"]
    assert folds[0] == compute_semi_supervised_splits(ids, labeled=0.2, seed=100).folds[0]


# ------------------------------------------------------------------------------------------------
# mode (c): imagesUnlabeled, and combinations
# ------------------------------------------------------------------------------------------------
def test_add_unlabeled_images_to_every_fold_with_labeled_fraction(env):
    train, extra = case_ids(10), case_ids(4, prefix="unl_")
    make_dataset(env, train, extra)
    folds = make_semi_supervised_splits(901, labeled=0.5, folds=2, fold_mode="resample", add_unlabeled_images=True)
    for fold in folds:
        assert set(extra) <= set(fold["unlabeled"])
        assert len(fold["unlabeled"]) == 4 + 4  # 4 hidden-label training cases + 4 imagesUnlabeled
        assert_partition(fold, train, extra)


def test_add_unlabeled_images_alone_keeps_all_training_labels(env):
    make_dataset(env, case_ids(5), ["u1", "u2"])
    fold = make_semi_supervised_splits(901, add_unlabeled_images=True)[0]
    assert fold["unlabeled"] == ["u1", "u2"] and len(fold["train"]) == 4 and len(fold["val"]) == 1


def test_add_unlabeled_images_without_imagesunlabeled_is_refused(env):
    """The option asks for imagesUnlabeled cases: none there is an error, not a split with 0 of them added."""
    make_dataset(env, case_ids(5))
    with pytest.raises(SKCDFInputError, match=r"--add-unlabeled-images: .*imagesUnlabeled does not exist.*"
                                              r"skcdf_preprocess_unlabeled.*drop --add-unlabeled-images"):
        make_semi_supervised_splits(901, add_unlabeled_images=True)
    (env["nnUNet_raw"] / "Dataset901_Fake" / "imagesUnlabeled").mkdir()
    with pytest.raises(SKCDFInputError, match=r"--add-unlabeled-images: .*imagesUnlabeled is empty"):
        make_semi_supervised_splits(901, labeled=0.5, add_unlabeled_images=True)
    assert not splits_path(env).exists()


def test_images_unlabeled_are_not_added_without_the_flag(env):
    make_dataset(env, case_ids(5), ["u1"])
    fold = make_semi_supervised_splits(901, labeled=0.5)[0]
    assert "u1" not in fold["unlabeled"] and len(fold["unlabeled"]) == 2  # only hidden-label training cases


# ------------------------------------------------------------------------------------------------
# the written file: nnU-Net's reader, atomic replacement, --overwrite
# ------------------------------------------------------------------------------------------------
def test_nnunet_reader_sees_train_and_val(env):
    make_dataset(env, case_ids(10), ["u1"])
    folds = make_semi_supervised_splits(901, labeled=0.5, folds=3, fold_mode="resample", add_unlabeled_images=True)
    for i, fold in enumerate(folds):
        tr_keys, val_keys = nnunet_do_split_read(splits_path(env).parent, i)
        assert tr_keys == fold["train"] and val_keys == fold["val"]
        assert not set(tr_keys) & set(val_keys)
        assert load_semi_supervised_fold(str(splits_path(env).parent), i) == (fold["train"], fold["val"],
                                                                              fold["unlabeled"])


def test_creates_the_preprocessed_folder(env):
    make_dataset(env, case_ids(4))
    assert not splits_path(env).parent.exists()
    make_semi_supervised_splits(901)
    assert splits_path(env).is_file()


def test_existing_file_needs_overwrite(env):
    make_dataset(env, case_ids(10))
    path = splits_path(env)
    path.parent.mkdir(parents=True)
    path.write_text('[{"train": ["case_000"], "val": ["case_001"]}]')
    with pytest.raises(SKCDFInputError) as e:
        make_semi_supervised_splits(901)
    msg = str(e.value)
    assert str(path) in msg and "nnU-Net's own 5-fold" in msg and "--overwrite" in msg
    assert "unlabeled" not in json.loads(path.read_text())[0]  # untouched
    make_semi_supervised_splits(901, overwrite=True)
    assert "unlabeled" in json.loads(path.read_text())[0]


def test_file_is_replaced_atomically(env, monkeypatch):
    make_dataset(env, case_ids(10))
    make_semi_supervised_splits(901, labeled=0.5)
    path = splits_path(env)
    before = path.read_text()
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(skcdf_io.os, "replace", spy)
    make_semi_supervised_splits(901, labeled=0.5, seed=1, overwrite=True)
    assert len(replaced) == 1 and replaced[0][1] == str(path)
    assert Path(replaced[0][0]).parent == path.parent  # same file system -> atomic rename
    json.loads(path.read_text())  # valid JSON
    assert path.read_text() != before

    # a crash while writing leaves the old complete file and no temporary file
    current = path.read_text()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(skcdf_io.json, "dump", crash)
    with pytest.raises(SKCDFWriteError, match=r"splits_final.json: cannot be written, .*disk full"):
        make_semi_supervised_splits(901, labeled=0.5, seed=2, overwrite=True)
    assert path.read_text() == current
    assert sorted(p.name for p in path.parent.iterdir()) == ["splits_final.json"]


# ------------------------------------------------------------------------------------------------
# errors of mode (a)
# ------------------------------------------------------------------------------------------------
def test_error_unknown_val_ids(env):
    make_dataset(env, case_ids(5))
    with pytest.raises(SKCDFInputError, match=r"--val-ids: unknown case id\(s\) nope.*imagesTr"):
        make_semi_supervised_splits(901, val_ids=["case_000", "nope"])


def test_error_broken_dataset_json_or_missing_imagestr_names_the_file(env):
    """A hand-written dataset.json with a syntax error or without a key nnU-Net needs, or a raw folder without
    imagesTr, is named with its fault (it was a JSONDecodeError / KeyError / FileNotFoundError traceback)."""
    raw = make_dataset(env, case_ids(5))
    dj = raw / "dataset.json"
    good = json.loads(dj.read_text())
    dj.write_text('{"labels": {"background": 0,}}')
    with pytest.raises(SKCDFInputError, match=rf"{dj} is not valid JSON \(Expecting property name"):
        make_semi_supervised_splits(901, labeled=2)
    for key, message in (("file_ending", r"lacks 'file_ending'"), ("channel_names", r"lacks 'channel_names'")):
        dj.write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        with pytest.raises(SKCDFInputError, match=rf"{dj} {message}: nnU-Net v2's dataset.json needs"):
            make_semi_supervised_splits(901, labeled=2)
    dj.write_text(json.dumps({**good, "labels": {"organ": 1}}))
    with pytest.raises(SKCDFInputError, match=r"'labels' must map names to values and include \"background\": 0"):
        make_semi_supervised_splits(901, labeled=2)
    dj.write_text(json.dumps([good]))
    with pytest.raises(SKCDFInputError, match=r"holds a list, not the object"):
        make_semi_supervised_splits(901, labeled=2)
    dj.write_text(json.dumps(good))
    shutil.rmtree(raw / "imagesTr")
    with pytest.raises(SKCDFInputError, match=rf"{raw / 'imagesTr'} does not exist"):
        make_semi_supervised_splits(901, labeled=2)


def test_error_repeated_val_ids():
    with pytest.raises(SKCDFInputError, match=r"--val-ids lists case_001 more than once: give each case once"):
        compute_semi_supervised_splits(case_ids(5), val_ids=["case_001", "case_002", "case_001"])


def test_error_val_id_without_label(env):
    make_dataset(env, case_ids(5), ["u1"])
    with pytest.raises(SKCDFInputError, match=r"u1 are imagesUnlabeled cases and have no label"):
        make_semi_supervised_splits(901, val_ids=["u1"])


def test_error_imagesunlabeled_id_collides_with_training_id(env):
    make_dataset(env, case_ids(5), ["case_001", "u1"])
    with pytest.raises(SKCDFInputError) as e:
        make_semi_supervised_splits(901, add_unlabeled_images=True)
    assert "case_001" in str(e.value) and "imagesUnlabeled" in str(e.value) and "rename" in str(e.value)


def test_error_more_labelled_than_available(env):
    make_dataset(env, case_ids(10))
    with pytest.raises(SKCDFInputError) as e:
        make_semi_supervised_splits(901, labeled=9)
    msg = str(e.value)
    assert "9 labelled cases requested but only 8" in msg and "2 validation cases" in msg and "--labeled 8" in msg


def test_error_fraction_rounds_to_zero_labelled(env):
    make_dataset(env, case_ids(10))
    with pytest.raises(SKCDFInputError, match=r"rounds to 0 labelled cases.*--labeled 1"):
        make_semi_supervised_splits(901, labeled=0.01)


def test_error_no_labelled_case_left(env):
    make_dataset(env, case_ids(3))
    with pytest.raises(SKCDFInputError, match=r"no labelled case: all 3 training cases are validation cases"):
        make_semi_supervised_splits(901, val=3)
    with pytest.raises(SKCDFInputError, match=r"4 validation cases requested but the dataset has only 3"):
        make_semi_supervised_splits(901, val=4)


@pytest.mark.parametrize("value", [0, -1, 1.0, 1.5, 0.0, "abc", "1.0", True, None])
def test_error_invalid_amount(value):
    with pytest.raises(SKCDFInputError, match=r"--labeled .* is not valid"):
        parse_amount(value, "--labeled", allow_all=True)


def test_parse_amount_forms():
    assert parse_amount("all", "--labeled", allow_all=True) == "all"
    assert parse_amount("0.2", "--val") == 0.2 and parse_amount("7", "--val") == 7
    with pytest.raises(SKCDFInputError, match="--val 'all' is not valid"):
        parse_amount("all", "--val")


@pytest.mark.parametrize("kwargs, message", [
    ({"folds": 0}, "--folds 0 is not valid"),
    ({"fold_mode": "shuffle"}, "--fold-mode 'shuffle' is not valid"),
    ({"id_template": "x_{}"}, "--id-template only applies to --import-lists"),
    ({"drop_overlaps_from": "val"}, "--drop-overlaps-from only applies to --import-lists"),
])
def test_error_option_misuse(kwargs, message):
    with pytest.raises(SKCDFInputError, match=message):
        compute_semi_supervised_splits(case_ids(5), **kwargs)


def test_error_import_lists_without_ratio(env):
    make_dataset(env, case_ids(5))
    with pytest.raises(SKCDFInputError, match="--import-lists and --ratio go together"):
        make_semi_supervised_splits(901, import_lists=str(env["nnUNet_raw"]))


# ------------------------------------------------------------------------------------------------
# mode (b): published lists (synthetic)
# ------------------------------------------------------------------------------------------------
def synthetic_lists(folder: Path, test: Sequence[str] | None = ("0009",)) -> Path:
    return write_lists(folder, "20p", ["0001", "0002"], ["0003", "0004", "0005"], ["0006", "0007"], test)


def test_import_exact_ids(env, tmp_path):
    ids = [f"{i:04d}" for i in range(1, 10)]
    make_dataset(env, ids)
    folds = make_semi_supervised_splits(901, import_lists=str(synthetic_lists(tmp_path / "l")), ratio="20p", folds=3)
    assert folds == [{"train": ["0001", "0002"], "val": ["0006", "0007"],
                      "unlabeled": ["0003", "0004", "0005"]}] * 3


def test_import_automatic_suffix_and_prefix_match(tmp_path):
    lists = read_published_lists(str(synthetic_lists(tmp_path / "l")), "20")  # '20' -> '20p'
    fold = compute_semi_supervised_splits([f"ds_{i:04d}" for i in range(1, 10)], imported=lists).folds[0]
    assert fold["train"] == ["ds_0001", "ds_0002"]
    fold = compute_semi_supervised_splits([f"img{i:04d}" for i in range(1, 10)], imported=lists).folds[0]
    assert fold["val"] == ["img0006", "img0007"]


def test_import_id_template(tmp_path):
    lists = read_published_lists(str(synthetic_lists(tmp_path / "l")), "20p")
    ids = [f"amos_{i:04d}" for i in range(1, 10)] + [f"other_{i:04d}" for i in range(1, 10)]
    fold = compute_semi_supervised_splits(ids, imported=lists, id_template="amos_{}").folds[0]
    assert fold["unlabeled"] == ["amos_0003", "amos_0004", "amos_0005"]


def test_error_import_ambiguous_ids_suggest_template(tmp_path):
    lists = read_published_lists(str(synthetic_lists(tmp_path / "l")), "20p")
    ids = [f"amos_{i:04d}" for i in range(1, 10)] + [f"other_{i:04d}" for i in range(1, 10)]
    with pytest.raises(SKCDFInputError) as e:
        compute_semi_supervised_splits(ids, imported=lists)
    msg = str(e.value)
    assert "labeled_20p.txt" in msg and "'0001' -> amos_0001, other_0001" in msg and "--id-template" in msg


def test_error_import_missing_ids_name_them_and_the_fix(tmp_path):
    lists = read_published_lists(str(synthetic_lists(tmp_path / "l")), "20p")
    with pytest.raises(SKCDFInputError) as e:
        compute_semi_supervised_splits([f"x{i}" for i in range(1, 10)] + ["0001", "0002"], imported=lists)
    msg = str(e.value)
    assert "unlabeled_20p.txt" in msg and "0003, 0004, 0005" in msg and "--id-template" in msg
    assert "imagesUnlabeled" in msg  # unlabelled ids need an image


def test_error_import_bad_template(tmp_path):
    lists = read_published_lists(str(synthetic_lists(tmp_path / "l")), "20p")
    with pytest.raises(SKCDFInputError, match=r"--id-template 'x_\{}' maps them to x_0001"):
        compute_semi_supervised_splits([f"ds_{i:04d}" for i in range(1, 10)], imported=lists, id_template="x_{}")
    with pytest.raises(SKCDFInputError, match=r"not a valid template"):
        compute_semi_supervised_splits([f"ds_{i:04d}" for i in range(1, 10)], imported=lists, id_template="x_{a}")


def test_import_unlabeled_ids_may_be_imagesunlabeled_cases(tmp_path):
    folder = write_lists(tmp_path / "l", "20p", ["t1"], ["t2", "u1"], ["t3"])
    fold = compute_semi_supervised_splits(["t1", "t2", "t3"], ["u1", "u2"], imported=read_published_lists(
        str(folder), "20p"), add_unlabeled_images=True).folds[0]
    assert fold == {"train": ["t1"], "val": ["t3"], "unlabeled": ["t2", "u1", "u2"]}


def test_error_import_labelled_id_without_label(tmp_path):
    folder = write_lists(tmp_path / "l", "20p", ["t1", "u1"], ["t2"], ["t3"])
    with pytest.raises(SKCDFInputError, match=r"imagesUnlabeled case\(s\) have no label.*labeled: u1"):
        compute_semi_supervised_splits(["t1", "t2", "t3"], ["u1"], imported=read_published_lists(str(folder), "20p"))


def test_error_import_test_leak(tmp_path):
    folder = synthetic_lists(tmp_path / "l", test=["0004", "0099"])  # 0099 is not in the dataset: fine
    lists = read_published_lists(str(folder), "20p")
    with pytest.raises(SKCDFInputError) as e:
        compute_semi_supervised_splits([f"{i:04d}" for i in range(1, 10)], imported=lists)
    msg = str(e.value)
    assert "test leak" in msg and "test & unlabeled: 0004" in msg and "--drop-overlaps-from unlabeled" in msg
    fold = compute_semi_supervised_splits([f"{i:04d}" for i in range(1, 10)], imported=lists,
                                          drop_overlaps_from="unlabeled").folds[0]
    assert fold["unlabeled"] == ["0003", "0005"]


def test_error_import_duplicate_id_in_one_list(tmp_path):
    folder = write_lists(tmp_path / "l", "20p", ["0001", "0002", "0001"], ["0003"], ["0006"])
    with pytest.raises(SKCDFInputError, match=r"labeled_20p.txt \(labelled\) in .* lists 0001 more than once.*"
                                              r"remove the repeated line"):
        compute_semi_supervised_splits([f"{i:04d}" for i in range(1, 10)],
                                       imported=read_published_lists(str(folder), "20p"))


def test_import_without_test_list(tmp_path):
    lists = read_published_lists(str(synthetic_lists(tmp_path / "l", test=None)), "20p")
    assert lists.test is None
    assert compute_semi_supervised_splits([f"{i:04d}" for i in range(1, 10)], imported=lists).folds == [
        {"train": ["0001", "0002"], "val": ["0006", "0007"], "unlabeled": ["0003", "0004", "0005"]}]


def test_error_missing_list_file(tmp_path):
    folder = synthetic_lists(tmp_path / "l")
    (folder / "eval.txt").unlink()
    with pytest.raises(SKCDFInputError) as e:
        read_published_lists(str(folder), "20p")
    assert "eval.txt" in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(SKCDFInputError, match=r"labeled_10p.txt, unlabeled_10p.txt.*Ratios available there: 20p"):
        read_published_lists(str(folder), "10p")
    with pytest.raises(SKCDFInputError, match="does not exist"):
        read_published_lists(str(tmp_path / "nowhere"), "20p")


def test_list_files_skip_blank_lines_and_comments(tmp_path):
    folder = synthetic_lists(tmp_path / "l")
    (folder / "labeled_20p.txt").write_text("# labelled\n0001\n\n  0002  # second\n")
    assert read_published_lists(str(folder), "20p").labeled == ["0001", "0002"]


@pytest.mark.parametrize("kwargs, message", [
    ({"labeled": 0.2}, "--labeled and --import-lists exclude each other"),
    ({"val_ids": ["0006"]}, "--val-ids and --import-lists exclude each other"),
    ({"folds": 2, "fold_mode": "resample"}, "resample .* cannot be used with --import-lists"),
])
def test_error_import_with_incompatible_options(tmp_path, kwargs, message):
    lists = read_published_lists(str(synthetic_lists(tmp_path / "l")), "20p")
    with pytest.raises(SKCDFInputError, match=message):
        compute_semi_supervised_splits([f"{i:04d}" for i in range(1, 10)], imported=lists, **kwargs)


def test_id_mapper_prefers_exact_match():
    mapper = IdMapper(["0001", "a_0001"])
    assert mapper.candidates("0001") == ["0001"]
    assert normalize_ratio(20) == "20p" and normalize_ratio("5p") == "5p"


# ------------------------------------------------------------------------------------------------
# mode (b): the real published lists
# ------------------------------------------------------------------------------------------------
def test_import_published_synapse_lists(env, capsys):
    folder = shared("synapse")
    list_ids = ids_of_list_folder(folder)
    assert len(list_ids) == 30
    make_dataset(env, [f"synapse_{i}" for i in list_ids], name="Dataset902_Synapse")
    folds = make_semi_supervised_splits(902, import_lists=str(folder), ratio="20p", folds=3)
    read = lambda f: [f"synapse_{line.strip()}" for line in (folder / f).read_text().splitlines() if line.strip()]
    assert len(folds) == 3 and folds[0] == folds[1] == folds[2]
    assert folds[0] == {"train": sorted(read("labeled_20p.txt")), "val": sorted(read("eval.txt")),
                        "unlabeled": sorted(read("unlabeled_20p.txt"))}
    assert (len(folds[0]["train"]), len(folds[0]["unlabeled"]), len(folds[0]["val"])) == (4, 16, 4)
    assert not set(read("test.txt")) & set().union(*map(set, folds[0].values()))
    assert "6 test.txt case(s)" in capsys.readouterr().out
    tr, val = nnunet_do_split_read(env["nnUNet_preprocessed"] / "Dataset902_Synapse", 2)
    assert tr == folds[0]["train"] and val == folds[0]["val"]
    # the explicit template gives the same split
    same = make_semi_supervised_splits(902, import_lists=str(folder), ratio="20p", folds=3,
                                       id_template="synapse_{}", overwrite=True)
    assert same == folds


def test_published_amos_20p_overlap_is_detected(env):
    folder = shared("amos")
    make_dataset(env, ids_of_list_folder(folder), name="Dataset903_AMOS")
    with pytest.raises(SKCDFInputError) as e:
        make_semi_supervised_splits(903, import_lists=str(folder), ratio="20p")
    msg = str(e.value)
    assert "20 case(s) are in two roles" in msg
    assert "labeled & val: amos_0066, amos_0349, amos_0381 (3)" in msg
    assert "unlabeled & val:" in msg and "(17)" in msg
    assert "--drop-overlaps-from val" in msg and "labeled_20p.txt" in msg
    assert not splits_path(env, "Dataset903_AMOS").exists()


def test_published_amos_20p_drop_overlaps_from_val(env, capsys):
    folder = shared("amos")
    make_dataset(env, ids_of_list_folder(folder), name="Dataset903_AMOS")
    fold = make_semi_supervised_splits(903, import_lists=str(folder), ratio="20p", drop_overlaps_from="val")[0]
    out = capsys.readouterr().out
    assert "dropped 3 id(s) from val that are also labeled: amos_0066, amos_0349, amos_0381" in out
    assert "dropped 17 id(s) from val that are also unlabeled" in out
    assert (len(fold["train"]), len(fold["unlabeled"]), len(fold["val"])) == (38, 154, 4)
    assert_partition(fold, set(fold["train"]) | set(fold["unlabeled"]) | set(fold["val"]))


def test_published_amos_20p_drop_from_unlabeled_leaves_labelled_overlap(env):
    folder = shared("amos")
    make_dataset(env, ids_of_list_folder(folder), name="Dataset903_AMOS")
    with pytest.raises(SKCDFInputError) as e:
        make_semi_supervised_splits(903, import_lists=str(folder), ratio="20p", drop_overlaps_from="unlabeled")
    msg = str(e.value)
    assert "3 case(s) are in two roles" in msg and "after --drop-overlaps-from unlabeled" in msg
    assert "--drop-overlaps-from val resolves all" in msg


def test_published_amos_20p_drop_from_labeled_hint_speaks_of_the_original_lists(env):
    """After dropping from labelled only unlabelled & val overlaps are left, which dropping from unlabelled would
    also clear, but on the original lists only --drop-overlaps-from val resolves everything."""
    folder = shared("amos")
    make_dataset(env, ids_of_list_folder(folder), name="Dataset903_AMOS")
    with pytest.raises(SKCDFInputError) as e:
        make_semi_supervised_splits(903, import_lists=str(folder), ratio="20p", drop_overlaps_from="labeled")
    msg = str(e.value)
    assert "17 case(s) are in two roles" in msg and "after --drop-overlaps-from labeled" in msg
    assert "on the original lists, --drop-overlaps-from val resolves all of them" in msg
    assert "--drop-overlaps-from unlabeled resolves" not in msg


def test_published_amos_lists_on_a_ct_only_dataset_name_the_mri_cases(env):
    """skcdf_convert_amos leaves out the MRI scans (ids > 500) unless --keep-mri: --id-template cannot help."""
    folder = shared("amos")
    ct_only = [i for i in ids_of_list_folder(folder) if int(i.split("_")[1]) <= 500]
    make_dataset(env, ct_only, name="Dataset903_AMOS")
    with pytest.raises(SKCDFInputError) as e:
        make_semi_supervised_splits(903, import_lists=str(folder), ratio="20p", drop_overlaps_from="val")
    msg = str(e.value)
    assert "6 id(s) of labeled_20p.txt (labelled)" in msg and "amos_0" in msg
    assert "AMOS MRI cases (ids > 500)" in msg and "skcdf_convert_amos --keep-mri" in msg
    assert "--id-template" not in msg


def test_published_amos_10p_is_clean(env):
    folder = shared("amos")
    make_dataset(env, ids_of_list_folder(folder), name="Dataset903_AMOS")
    fold = make_semi_supervised_splits(903, import_lists=str(folder), ratio="10p")[0]
    assert (len(fold["train"]), len(fold["val"])) == (21, 24)


# ------------------------------------------------------------------------------------------------
# validate_splits and load_semi_supervised_fold (used by the trainer)
# ------------------------------------------------------------------------------------------------
TRAIN = ["a", "b", "c", "d"]


def good_fold() -> Dict[str, List[str]]:
    return {"train": ["a"], "val": ["b"], "unlabeled": ["c", "u1"]}


def test_validate_accepts_a_good_split():
    validate_splits([good_fold(), good_fold()], TRAIN, ["u1"])


@pytest.mark.parametrize("change, message", [
    ({"train": ["a", "zz"]}, r"fold 1: unknown case id\(s\).*labeled: zz"),
    ({"unlabeled": ["c", "ghost"]}, r"unlabelled id\(s\) with no image: ghost.*imagesUnlabeled"),
    ({"val": ["u1"], "unlabeled": ["c"]}, r"have no label.*val: u1"),
    ({"val": ["a"]}, r"(?s)in two roles.*labeled & val: a"),
    ({"unlabeled": ["b", "c"]}, r"(?s)in two roles.*unlabeled & val: b"),
    ({"train": []}, r"fold 1: no labelled case"),
])
def test_validate_errors(change, message):
    with pytest.raises(SKCDFInputError, match=message):
        validate_splits([good_fold(), {**good_fold(), **change}], TRAIN, ["u1"])


@pytest.mark.parametrize("change, message", [
    ({"train": ["a", "a"]}, r"fold 1: 'train' \(labelled\) lists a more than once.*each case once"),
    ({"unlabeled": ["c", "u1", "c"]}, r"fold 1: 'unlabeled' \(unlabelled\) lists c more than once"),
    ({"train": ["a", 3]}, r"fold 1: 'train' must be a list of case id strings; entry 2 is 3 \(int\)"),
    ({"val": "b"}, r"fold 1: 'val' must be a list of case id strings; got 'b' \(str\)"),
])
def test_validate_duplicate_and_non_string_ids(change, message):
    with pytest.raises(SKCDFInputError, match=message):
        validate_splits([good_fold(), {**good_fold(), **change}], TRAIN, ["u1"])


@pytest.mark.parametrize("missing", ["train", "val"])
def test_fold_without_train_or_val_names_the_key(tmp_path, missing):
    fold = good_fold()
    fold.pop(missing)
    with pytest.raises(SKCDFInputError, match=rf"fold 1: no '{missing}' key.*nnU-Net's format"):
        validate_splits([good_fold(), fold], TRAIN, ["u1"])
    (tmp_path / "splits_final.json").write_text(json.dumps([good_fold(), fold]))
    with pytest.raises(SKCDFInputError, match=rf"splits_final.json: fold 1: no '{missing}' key.*skcdf_split"):
        load_semi_supervised_fold(str(tmp_path), 1)


def test_validate_test_leak_and_collision_and_structure():
    with pytest.raises(SKCDFInputError, match=r"(?s)test leak.*test & unlabeled: c"):
        validate_splits([good_fold()], TRAIN, ["u1"], test_ids=["c"])
    with pytest.raises(SKCDFInputError, match=r"Case id\(s\) a exist both in imagesTr and in imagesUnlabeled"):
        validate_splits([good_fold()], TRAIN, ["a"])
    with pytest.raises(SKCDFInputError, match=r"no 'unlabeled' key: the split was not made with skcdf_split"):
        validate_splits([{"train": ["a"], "val": ["b"]}], TRAIN, [])
    with pytest.raises(SKCDFInputError, match="non-empty list of folds"):
        validate_splits([], TRAIN, [])


def test_load_fold_errors(tmp_path):
    with pytest.raises(SKCDFInputError) as e:
        load_semi_supervised_fold(str(tmp_path), 0)
    assert "splits_final.json does not exist" in str(e.value) and "skcdf_split -d" in str(e.value)
    (tmp_path / "splits_final.json").write_text(json.dumps([good_fold()]))
    assert load_semi_supervised_fold(str(tmp_path), "0") == (["a"], ["b"], ["c", "u1"])
    with pytest.raises(SKCDFInputError, match=r"fold 1 is out of range: .* has 1 fold\(s\).*--folds 2"):
        load_semi_supervised_fold(str(tmp_path), 1)
    with pytest.raises(SKCDFInputError, match="needs a fold index"):
        load_semi_supervised_fold(str(tmp_path), "all")


def test_load_fold_of_nnunet_own_split(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    (tmp_path / "splits_final.json").write_text(json.dumps(generate_crossval_split(case_ids(10), 12345, 5)))
    with pytest.raises(SKCDFInputError) as e:
        load_semi_supervised_fold(str(tmp_path), 3)
    msg = str(e.value)
    assert "no 'unlabeled' key" in msg and "not made with skcdf_split" in msg and "skcdf_split -d" in msg


# ------------------------------------------------------------------------------------------------
# console script
# ------------------------------------------------------------------------------------------------
def cli() -> List[str]:
    exe = shutil.which("skcdf_split")
    return [exe] if exe else [sys.executable, "-m", "nnunetv2_skcdf.splits.semi_supervised_splits"]


def test_cli_help():
    out = subprocess.run(cli() + ["--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--labeled", "--val-ids", "--import-lists", "--ratio", "--id-template", "--drop-overlaps-from",
                 "--add-unlabeled-images", "--folds", "--fold-mode", "--seed", "--overwrite", "examples:"):
        assert flag in out


def test_cli_run_prints_summary(env):
    make_dataset(env, case_ids(10), ["u1", "u2"])
    res = subprocess.run(cli() + ["-d", "901", "--labeled", "0.5", "--folds", "2", "--fold-mode", "resample",
                                  "--add-unlabeled-images"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fold 1: 4 labelled, 6 unlabelled (4 training cases with hidden labels + 2 imagesUnlabeled), 2 val" \
        in res.stdout
    assert f"Wrote {splits_path(env)}" in res.stdout
    assert len(json.loads(splits_path(env).read_text())) == 2


def test_cli_error_exits_2_without_traceback(env):
    make_dataset(env, case_ids(10))
    splits_path(env).parent.mkdir(parents=True)
    splits_path(env).write_text("[]")
    res = subprocess.run(cli() + ["-d", "901"], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("ERROR: ") and "--overwrite" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(cli() + ["-d", "901", "--val", "0.2", "--val-ids", "case_001"], capture_output=True, text=True)
    assert res.returncode == 2 and "--val and --val-ids exclude each other" in res.stderr


def test_split_entry_in_process(env, capsys):
    make_dataset(env, case_ids(6))
    with pytest.raises(SystemExit) as e:
        sss.split_entry(["-d", "901", "--labeled", "7"])
    assert e.value.code == 2
    assert "ERROR: --labeled 7: 7 labelled cases requested" in capsys.readouterr().err

"""``skcdf_trainer_path``: print the folder to put into ``nnUNet_extTrainer``.

    export nnUNet_extTrainer=$(skcdf_trainer_path)

nnU-Net 2.8's ``nnUNetv2_train`` and ``nnUNetv2_predict`` then find ``SKCDFTrainer`` and its variants by
name, without copying files into site-packages.
"""
import os


def trainer_folder() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def trainer_path_entry() -> None:
    print(trainer_folder())

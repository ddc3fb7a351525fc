"""nnunetv2_skcdf: SKCDF semi-supervised, class-imbalance-aware training as an nnU-Net v2 extension."""
from setuptools import find_packages, setup

setup(
    name="nnunetv2_skcdf",
    version="0.4.0",
    description="SKCDF (CVPR 2025) semi-supervised class-imbalanced segmentation for nnU-Net v2",
    packages=find_packages(include=["nnunetv2_skcdf", "nnunetv2_skcdf.*"]),
    python_requires=">=3.10",
    install_requires=[
        # 2.8.0 introduced the nnUNet_extTrainer lookup that registers our trainer without touching
        # site-packages; <2.9 because we subclass nnUNetTrainer/DefaultPreprocessor/nnUNetDataLoader
        # internals that change between minor releases.
        "nnunetv2>=2.8,<2.9",
        # nnunetv2 2.8 requires torch>=2.1.2 (not 2.9.*); we use torch.amp and foreach ops from 2.1.
        "torch>=2.1.2,!=2.9.*",
        # the versions nnunetv2 2.8 was released against; data loading and transforms come from them.
        "batchgenerators>=0.25.1",
        "batchgeneratorsv2>=0.3.2",
        "acvl-utils>=0.2.6,<0.3",
        "dynamic-network-architectures>=0.4.4,<0.5",
        # reading/writing NIfTI with geometry (the phantom, the unlabelled image checks).
        "SimpleITK>=2.2.1",
        # NIfTI voxels as stored: SimpleITK 2.5 reads NaN/inf as 0, so the unlabelled NaN check and the .nii
        # truncation check read NIfTI with nibabel (already an nnunetv2 dependency; listed because we import it).
        "nibabel",
        "blosc2>=3.3.2",
        "numpy>=1.24",
        "scipy>=1.10",
        "tqdm",
        # the evaluation's bar chart and the per-case CSV (both already nnunetv2 dependencies).
        "matplotlib",
        "pandas",
    ],
    # medpy (GPL-3) is a test oracle for the surface metrics only; never imported by the package.
    # build: the slow test that builds and installs the wheel (tests/test_wheel_install.py).
    extras_require={"test": ["pytest>=7", "medpy>=0.5", "build"]},
    entry_points={
        "console_scripts": [
            "skcdf_make_phantom=nnunetv2_skcdf.dataset_conversion.phantom:make_phantom_entry",
            "skcdf_split=nnunetv2_skcdf.splits.semi_supervised_splits:split_entry",
            "skcdf_preprocess_unlabeled=nnunetv2_skcdf.preprocessing.unlabeled:preprocess_unlabeled_entry",
            "skcdf_add_cpu_config=nnunetv2_skcdf.experiment_planning.cpu_configuration:add_cpu_config_entry",
            "skcdf_trainer_path=nnunetv2_skcdf.training.nnUNetTrainer.trainer_path:trainer_path_entry",
            "skcdf_dice_table=nnunetv2_skcdf.evaluation.dice_table:dice_table_entry",
            "skcdf_evaluate=nnunetv2_skcdf.evaluation.evaluate:evaluate_entry",
            "skcdf_convert_synapse=nnunetv2_skcdf.dataset_conversion.convert_synapse:convert_synapse_entry",
            "skcdf_convert_amos=nnunetv2_skcdf.dataset_conversion.convert_amos:convert_amos_entry",
            "skcdf_pseudolabel=nnunetv2_skcdf.pseudo_labelling.pseudo_label_round:pseudolabel_entry",
        ]
    },
)

"""Mixin: no mirroring, neither as augmentation nor as test-time augmentation (like nnU-Net's
``nnUNetTrainerNoMirroring``). Short CPU runs use it: 3D test-time mirroring costs 8x in the final validation."""


class NoMirroringMixin:
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

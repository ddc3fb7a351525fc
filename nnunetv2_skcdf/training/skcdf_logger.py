"""nnU-Net's local logger with the SKCDF curves: L_sup, L_u, lambda and the pseudo-label class distribution.

The values live in the same ``my_fantastic_logging`` dict as nnU-Net's (one value per epoch), so they are
checkpointed and restored with ``--c`` by nnU-Net's own logger checkpointing. ``progress.png`` gets a fourth
panel with the SKCDF curves below nnU-Net's three.
"""
from __future__ import annotations

import matplotlib
import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunetv2_skcdf.utilities.io import atomic_output

SKCDF_KEYS = ("train_l_sup", "train_l_u", "consistency_weight", "pseudo_label_fractions")


class SKCDFLocalLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for key in SKCDF_KEYS:
            self.my_fantastic_logging[key] = []

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        for key in SKCDF_KEYS:  # a checkpoint of a plain nnUNetTrainer has none of them
            self.my_fantastic_logging.setdefault(key, [])

    def plot_progress_png(self, output_folder):
        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1  # as nnU-Net: the last epoch every key has a value for
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(4, 1, figsize=(30, 72))
        self._plot_nnunet_panels(axes[:3], x, epoch)
        self._plot_skcdf_panel(axes[3], x, epoch)
        plt.tight_layout()
        with atomic_output(join(output_folder, "progress.png")) as tmp:  # a reader never sees half a picture
            fig.savefig(tmp)
        plt.close(fig)

    def _plot_nnunet_panels(self, axes, x, epoch):
        """The three panels of nnU-Net's progress.png (losses + pseudo Dice, epoch time, learning rate)."""
        log = self.my_fantastic_logging
        ax, ax2 = axes[0], axes[0].twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", ls="-", label="loss_tr", linewidth=4)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", ls="-", label="loss_val", linewidth=4)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", ls="-", label="pseudo dice (mov. avg.)", linewidth=4)
        ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1)), ax2.legend(loc=(0.2, 1))
        durations = np.array(log["epoch_end_timestamps"][:epoch + 1]) - np.array(log["epoch_start_timestamps"][:epoch + 1])
        axes[1].plot(x, durations, color="b", ls="-", label="epoch duration", linewidth=4)
        axes[1].set_xlabel("epoch"), axes[1].set_ylabel("time [s]"), axes[1].legend(loc=(0, 1))
        axes[2].plot(x, log["lrs"][:epoch + 1], color="b", ls="-", label="learning rate", linewidth=4)
        axes[2].set_xlabel("epoch"), axes[2].set_ylabel("learning rate"), axes[2].legend(loc=(0, 1))

    def _plot_skcdf_panel(self, ax, x, epoch):
        log = self.my_fantastic_logging
        ax.plot(x, log["train_l_sup"][:epoch + 1], color="b", label="L_sup", linewidth=4)
        ax.plot(x, log["train_l_u"][:epoch + 1], color="m", label="L_u", linewidth=4)
        ax.set_xlabel("epoch"), ax.set_ylabel("loss")
        ax2 = ax.twinx()
        ax2.plot(x, log["consistency_weight"][:epoch + 1], color="k", ls="--", label="lambda(t)", linewidth=3)
        ax2.set_ylabel("consistency weight")
        ax.legend(loc=(0, 1)), ax2.legend(loc=(0.2, 1))

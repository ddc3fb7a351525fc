"""``SKCDFTrainer``: SKCDF semi-supervised training inside nnU-Net v2.

Found by the stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` through nnU-Net's external-trainer lookup:
``export nnUNet_extTrainer=$(skcdf_trainer_path)``. Overrides only the hooks it needs: network construction,
data loaders (adds the unlabelled stream), ``train_step``, epoch-end logging and deep-supervision switching.
Optimiser, learning-rate schedule, patch and batch size, validation, checkpointing and inference are nnU-Net's.

One iteration (see ``shared/design/skcdf_method.md``): EMA updates (H_l<-H_l_b, D_u<-D_l, H_u<-H_u_b), labelled
pass in cross mode on [x_l; x_u] through D_l with L_sup = DC+CE(P, y) + masked DC+CE(P_b, y, M_l), pseudo
labels from D_l, unlabelled pass in self mode through D_u reusing the encoder features of x_u with
L_u = DC+CE(Q, p) + masked DC+CE(Q_b, p_b, M_u), and one optimiser step on L_sup + lambda(t) L_u. Opt-in extension
(``unlabelled_view = "strong_intensity"``, ``SKCDFTrainer_strongView``): the unlabelled pass runs on its own
encoder pass of an intensity-perturbed copy of x_u (made by the unlabelled loader, on the CPU), the pseudo labels
still come from x_u. Another (``appearance_transfer``, ``SKCDFTrainer_histMatch``): before the labelled pass, each
labelled sample may be mapped from its case's intensity distribution onto that of an unlabelled sample's case
(labels unchanged). A third (``copy_paste``, ``SKCDFTrainer_copyPaste``): a box of a labelled sample is pasted into
an unlabelled one before the labelled pass (both decoders' passes see the mixed image), and D_u learns the true
labels inside the box, the pseudo labels outside. A fourth
(``pseudo_label_threshold``, ``SKCDFTrainer_confidence``): pseudo-label voxels below a softmax maximum leave D_u's
losses.

A run trains by the rules it started with: every setting (the class attributes and the hyperparameter block) is
saved with the weights (``skcdf_settings``); ``--c`` refuses other rules, naming each difference and the trainer
that resumes the run unchanged (the release trainers of ``variants/releases`` pin every former default set).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import autocast
from torch import distributed as dist
from torch._dynamo import OptimizedModule

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_skcdf.network.architectures.skcdf_unet import SKCDFUNet, build_skcdf_unet
from nnunetv2_skcdf.network.building_blocks.skc import SKCModule, resolve_window
from nnunetv2_skcdf.training import skcdf_components as C
from nnunetv2_skcdf.training import skcdf_settings as S
from nnunetv2_skcdf.training.skcdf_logger import SKCDFLocalLogger
from nnunetv2_skcdf.training.unlabelled_stream import UnlabelledStream
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError


class SKCDFTrainer(UnlabelledStream, nnUNetTrainer):
    # --- architecture (class attributes: build_network_architecture is called on the class by the predictor) ---
    skc_heads: int = 2               # attention heads h of the SKC module (reference: 2)
    skc_window = None                # local window; None = 2 per axis (1 on size-1 axes), masked padding; "divisor":
                                     # largest divisor of the bottleneck <= 2 per axis, no padding (the rule before
                                     # commit f152b61: release 0.1.0 and 0.2.0 until padding landed)
    skc_order: str = "local_global"  # "local_global" (paper), "global_local" / "parallel" (ablations)
    skc_dropout: float = 0.1         # dropout of the attention output (specification)
    skc_attention_dropout: float = 0.0  # dropout of the attention weights (reference code: 0.1)
    skc_self_heads: str = "joint"    # self-mode scores: one hK x hK matrix, or "per_head" (reference code: h of K x K)
    # --- ablations (variants/ablation): each switches off one part of the method ---
    skc_enabled: bool = True         # False: plain bottleneck, no SKC module
    labelled_attention_mode: str = "cross"  # "self": self- instead of cross-attention in the labelled pass
    balanced_heads: bool = True      # False: no ABC heads (main heads only, no balanced masks)
    decoupled: bool = True           # False: one decoder learns from labels and pseudo labels
    # --- the release whose settings this trainer pins (variants/releases, legacy names); None: today's defaults ---
    skcdf_release = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # --- SKCDF hyperparameters (method page: reference values) ---
        self.ema_momentum = 0.99          # m: D_u <- m D_u + (1-m) D_l; main heads <- balanced heads with the step
        #                                   head_ema gives (lr-scaled by default, not the constant m)
        self.ema_couple_decoders = True   # False: no D_u <- D_l EMA (ablation); the head EMA stays
        self.ema_buffers = False          # False: the EMA averages parameters only (the reference); True: floating
        #                                   buffers too (BatchNorm running statistics), the rule up to 0.4. Only
        #                                   BatchNorm plans have such buffers (nnU-Net's default InstanceNorm: none)
        self.head_ema = "lr_scaled"       # main heads <- balanced heads: step (1-m) x lr / initial lr (default since
        #                                   0.3.0, measured: BENCHMARKS_FINDINGS.md items 4-8); "constant": m every
        #                                   iteration (the reference, default up to 0.2); "off": no head EMA
        self.consistency_weight = 10.0    # w in lambda(t) = w exp(-5 (1 - t/T_ramp)^2)
        self.rampup_epochs = None         # T_ramp; None = all epochs (reference), 0 = no ramp-up
        self.masking = "multiply"         # "multiply": the reference code's, masked voxels become zero logits with a
        #                                   background target (default since 0.4.0; BENCHMARKS_FINDINGS.md item 15);
        #                                   "exclude": masked voxels leave CE and Dice (the default up to 0.3)
        self.unlabeled_batch_size = None  # None = the plans' (DDP-adjusted) labelled batch size
        self.keep_rate_source = "labelled_cases"  # class keep-rates from the voxel counts of the fold's labelled
        #                                   training cases (the reference counts its first 4; not implemented)
        self.unlabelled_view = "same"     # "same": D_u learns on the view the pseudo labels come from (reference);
        #                                   "strong_intensity": on a copy perturbed by nnU-Net's intensity transforms
        #                                   at high probability (extension, opt-in; BENCHMARKS_FINDINGS.md: why in
        #                                   item 13, measured in item 17: no gain)
        self.appearance_transfer = 0.0    # probability that a labelled sample is mapped from its case's intensity
        #                                   distribution onto an unlabelled sample's case's (its intensities take on
        #                                   that image's, e.g. another site's contrast phase; labels unchanged).
        #                                   0: off (reference); SKCDFTrainer_histMatch: 0.5 (extension)
        self.copy_paste = 0.0             # probability that an unlabelled sample gets a box of a labelled sample
        #                                   pasted in (the same position in both patches); D_u learns the true
        #                                   labels inside the box, the pseudo labels outside. 0: off (reference);
        #                                   SKCDFTrainer_copyPaste: 1.0 (extension, after bidirectional copy-paste)
        self.copy_paste_size = 2 / 3      # the box's edge as a fraction of the patch along each axis (BCP's 2/3)
        self.pseudo_label_threshold = 0.0  # voxels whose pseudo label comes with a softmax maximum below this leave
        #                                   D_u's losses (nnU-Net's ignore path; pasted boxes always stay). 0: off
        #                                   (reference); SKCDFTrainer_confidence: 0.95 (extension, as FixMatch)
        self.skc_cross_group = 2          # cross attention of the labelled pass in groups of this many labelled and
        #                                   unlabelled samples (the reference's batch of 2 + 2); None: every sample
        #                                   reads the whole other half, whose cost grows with the batch squared
        #                                   (channel_attention's docstring). Acts only on batches > 2 per half (2D)
        self.max_nonfinite_steps = 5      # non-finite losses in a row before training stops (each one is skipped)
        # --- state ---
        self.dataloader_unlabeled = None
        self.masked_loss = None
        self.nonfinite_in_a_row = 0
        self._resumed_from = None  # the checkpoint load_checkpoint read (--c, --val), if any
        self.logger.local_logger = SKCDFLocalLogger()
        if self.label_manager.has_regions:
            raise SKCDFInputError("SKCDF needs class labels; region-based training (dataset.json regions) is not "
                                  "supported. Use nnUNetTrainer for region-based datasets.")

    # ------------------------------------------------------------------------------------------ settings
    _CHOICES = {"masking": ("exclude", "multiply"),
                "head_ema": ("lr_scaled", "constant", "off"),
                "unlabelled_view": ("same", "strong_intensity"),
                "ema_couple_decoders": (True, False),
                "ema_buffers": (False, True),
                "keep_rate_source": ("labelled_cases",)}

    def initialize(self):
        self._check_settings()  # before the network is built or a dataloader started: a typo fails at once
        super().initialize()
        self._net().cross_group = self.skc_cross_group
        self._net().training_record = self._training_record()  # on every rank, so that DDP ranks stay identical

    def skcdf_settings(self) -> dict:
        """Every setting as it acts on this trainer's network (``skcdf_settings.effective``): what a checkpoint
        records and what ``--c`` compares."""
        net = self._net()
        bottleneck = net.skc.spatial_size if isinstance(net.skc, SKCModule) else None
        return S.effective(S.raw_settings(self), bottleneck, net.decoders_have_float_buffers, self._batch_halves())

    def _batch_halves(self) -> Tuple[int, int]:
        """(labelled, unlabelled) samples per training step on this process (the cross-attention groups' halves)."""
        return self.batch_size, self.unlabeled_batch_size or self.batch_size

    def _training_record(self) -> dict:
        """The trainer's part of the settings record (the network adds its architecture as built)."""
        own = self.skcdf_settings()
        return {"trainer": type(self).__name__, "training": {k: own[k] for k in S.TRAINING_SETTINGS}}

    def _check_settings(self) -> None:
        """The training switches a subclass sets in ``__init__``, refused with the accepted values if unknown
        (unchecked, a misspelt ``masking`` would silently train with the other masking)."""
        for name in self._CHOICES:
            self._setting(name)
        numbers = {"ema_momentum": 0.0 <= self.ema_momentum <= 1.0,
                   "appearance_transfer": 0.0 <= self.appearance_transfer <= 1.0,
                   "copy_paste": 0.0 <= self.copy_paste <= 1.0,
                   "copy_paste_size": 0.0 < self.copy_paste_size <= 1.0,
                   "pseudo_label_threshold": 0.0 <= self.pseudo_label_threshold < 1.0,
                   "consistency_weight": self.consistency_weight >= 0,
                   "rampup_epochs": self.rampup_epochs is None or self.rampup_epochs >= 0,
                   "unlabeled_batch_size": self.unlabeled_batch_size is None or self.unlabeled_batch_size >= 1,
                   "skc_cross_group": self.skc_cross_group is None or (
                       isinstance(self.skc_cross_group, int) and not isinstance(self.skc_cross_group, bool)
                       and self.skc_cross_group >= 1)}
        for name, ok in numbers.items():
            if not ok:
                raise ValueError(f"{type(self).__name__}.{name} = {getattr(self, name)!r} is out of range "
                                 f"(ema_momentum, appearance_transfer and copy_paste in [0, 1], copy_paste_size in "
                                 f"(0, 1], pseudo_label_threshold in [0, 1), consistency_weight >= 0, "
                                 f"rampup_epochs None or >= 0, unlabeled_batch_size and skc_cross_group None or an "
                                 f"integer >= 1).")

    def _setting(self, name: str) -> str:
        """The value of a named training switch, refused with the accepted values if unknown (also when it was
        changed after ``initialize``)."""
        value, choices = getattr(self, name), self._CHOICES[name]
        if value not in choices:
            raise ValueError(f"{type(self).__name__}.{name} = {value!r}: use one of "
                             f"{', '.join(repr(c) for c in choices)} (set in the trainer's __init__).")
        return value

    # ------------------------------------------------------------------------------------------ network
    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> SKCDFUNet:
        return build_skcdf_unet(configuration_manager.network_arch_class_name,
                                configuration_manager.network_arch_init_kwargs,
                                configuration_manager.network_arch_init_kwargs_req_import,
                                num_input_channels, num_output_channels, configuration_manager.patch_size,
                                enable_deep_supervision, skc_heads=cls.skc_heads, skc_window=cls.skc_window,
                                skc_order=cls.skc_order, skc_dropout=cls.skc_dropout,
                                skc_attention_dropout=cls.skc_attention_dropout, skc_enabled=cls.skc_enabled,
                                balanced_heads=cls.balanced_heads, decoupled=cls.decoupled,
                                labelled_attention_mode=cls.labelled_attention_mode,
                                skc_self_heads=cls.skc_self_heads)

    def _net(self) -> SKCDFUNet:
        """The SKCDFUNet behind DDP / torch.compile wrappers."""
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def set_deep_supervision_enabled(self, enabled: bool):
        self._net().set_deep_supervision(enabled)

    def _build_loss(self):
        """nnU-Net's DC+CE (+ deep supervision); the balanced heads get a second instance whose ignore value
        marks masked voxels, so masking reuses nnU-Net's ignore-label path of CE and Dice exactly."""
        self.masked_loss = C.set_ignore_value(super()._build_loss(), self.mask_ignore_value)
        return super()._build_loss()

    @property
    def mask_ignore_value(self) -> int:
        """A label value no class uses (the dataset's ignore label, if any, is mapped to it as well)."""
        return max(self.label_manager.all_labels) + 1 if self.label_manager.ignore_label is None \
            else self.label_manager.ignore_label

    # ------------------------------------------------------------------------------------------ data
    # the unlabelled stream's start, split check and end: UnlabelledStream; the student's view (opt-in) here
    def _student_view_transform(self):
        """The per-sample transform of the student's view (``unlabelled_view = "strong_intensity"``), run by the
        unlabelled loader on the CPU; None for the reference (D_u reuses x_u's encoder features)."""
        if self._setting("unlabelled_view") == "same":
            return None
        do_dummy_2d = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[1]
        # as nnU-Net: no low-resolution simulation along a dummy-2D axis
        return C.strong_intensity_transform((0,) if do_dummy_2d else None)

    def on_train_start(self):
        if self._resumed_from is not None:  # --c: the checkpoint's rules must be this trainer's
            self._check_resumed_settings()
        elif self.was_initialized:  # network built before, e.g. with pretrained weights loaded into it
            self._refuse_adopted_window()
            self._forget_pretrained_heads()
        super().on_train_start()
        self._seed_ranks_apart()
        self._remove_stale_checkpoint_temporaries()
        self._init_class_keep_rates()

    def _forget_pretrained_heads(self) -> None:
        """Pretrained weights of an SKCDF model (``nnUNetv2_train ... -pretrained_weights``): nnU-Net transfers every
        weight but the segmentation heads (keys with ``.seg_layers.``), which lets the balanced heads
        (``balanced_seg_layers``) and the class voxel counts behind the keep-rates slip through. Both belong to the
        other run's labels, so both start anew here, as the main heads do: the heads with nnU-Net's initialisation,
        the counts from this fold's labelled cases (a freshly built network has none, so nonzero counts before any
        training mean that weights were loaded)."""
        from pydoc import locate

        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        net = self._net()
        if int(net.class_voxel_counts.sum()) == 0:
            return
        net.class_voxel_counts.zero_()
        # the initialisation build_skcdf_unet gives them: the plans' network class's own
        initialize = getattr(locate(self.configuration_manager.network_arch_class_name), "initialize", None) \
            or InitWeights_He(1e-2)
        for decoder in dict.fromkeys((net.decoder_l, net.decoder_u)):  # one decoder in the no-decoupling ablation
            if decoder.has_balanced_heads:
                decoder.balanced_seg_layers.apply(initialize)
                if self.is_ddp:  # the network is wrapped already: every rank takes rank 0's new heads
                    for parameter in decoder.balanced_seg_layers.parameters():
                        dist.broadcast(parameter.data, src=0)
        self.print_to_log_file("pretrained SKCDF weights: their balanced heads and class voxel counts belong to the "
                               "other run's labels and are not taken over (as nnU-Net's main heads); the balanced "
                               "heads start from nnU-Net's initialisation, the counts from this fold's labelled cases")

    def _seed_ranks_apart(self) -> None:
        """DDP: every process starts from PyTorch's same default seed, so the random fields behind the balanced
        masks, dropout and copy-paste boxes would be the same on every rank at every step (correlated masks add
        variance to the averaged gradient). Each rank > 0 gets its own seed; one process keeps PyTorch's default."""
        if self.is_ddp and dist.get_rank() > 0:
            torch.manual_seed(torch.initial_seed() + dist.get_rank())

    def _refuse_adopted_window(self) -> None:
        """Weights with another local SKC window were loaded into a rebuilt local block (``SKCDFUNet.load_state_dict``):
        fine for prediction and validation, but the optimiser holds the replaced parameters, so training on would
        leave it untrained."""
        skc = self._net().skc
        if not isinstance(skc, SKCModule):
            return
        built = resolve_window(skc.spatial_size, self.skc_window)
        if skc.local_block.window != built:
            candidates = S.release_candidates({"skc_enabled": True, "skc_window": list(skc.local_block.window)},
                                              skc.spatial_size, False, keys=("skc_window",))
            raise SKCDFInputError(
                f"the loaded weights have the local SKC window {list(skc.local_block.window)}; "
                f"{type(self).__name__} builds {list(built)} for the bottleneck {list(skc.spatial_size)}, and "
                f"training on would leave the rebuilt local block untrained. Train with a trainer that builds that "
                f"window ({', '.join(candidates) or 'skc_window = ' + repr(list(skc.local_block.window))}), or start "
                f"without these weights.")

    # ------------------------------------------------------------------------------------------ settings of a resume
    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, remembering what was loaded: ``on_train_start`` (``--c``) then compares the checkpoint's
        settings with this trainer's. ``--val`` and prediction compare the architecture only (in the network's
        ``load_state_dict``)."""
        super().load_checkpoint(filename_or_checkpoint)
        self._resumed_from = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "<checkpoint>"

    def _check_resumed_settings(self) -> None:
        """Refuse to continue a checkpoint with other rules than it was trained with, naming each difference and
        the trainer that continues it unchanged; refuse one whose rules are not known (documentation/migration.md,
        resume matrix)."""
        settings, source = self._checkpoint_settings()
        if settings is None:
            raise SKCDFInputError(self._unknown_settings_message(source))
        diffs = S.differences(settings, self.skcdf_settings())
        if diffs:
            raise SKCDFInputError(self._other_rules_message(diffs, settings, source))
        self.print_to_log_file(f"SKCDF settings of the checkpoint ({source}): those of {type(self).__name__}, "
                               f"resumed unchanged")

    def _checkpoint_settings(self) -> Tuple[Optional[dict], str]:
        """(settings, where they come from) of the loaded checkpoint; (None, why not) when they are not known.

        Recorded in the weights, or, for a checkpoint written before records existed, inferred where certain:
        nnU-Net's debug.json (every trainer attribute, written when a session starts) if it predates the
        checkpoint's last epoch; else a trainer that names a release (release trainers, the old names) vouches for
        its own rules. The architecture the shapes show (window, heads, SKC, balanced heads) always comes from the
        loaded weights."""
        net = self._net()
        record, shapes = net.loaded_record, net.architecture()  # after loading: the checkpoint's window
        if record is not None and record.get("training") is not None:
            recorded = {**record["architecture"], **record["training"]}
            # a setting added after the record was written: the value every earlier run trained with
            older = {k: S.BEFORE_IT_EXISTED[k] for k in S.SETTINGS if k not in recorded and k in S.BEFORE_IT_EXISTED}
            return {**older, **recorded}, f"recorded by {record.get('trainer')}"
        known = (record or {}).get("architecture") or {k: shapes[k] for k in S.SHAPE_SETTINGS}
        bottleneck = net.skc.spatial_size if isinstance(net.skc, SKCModule) else None
        debug, why = self._trusted_debug_settings()
        if debug is not None:
            settings = {**S.effective(debug, bottleneck, net.decoders_have_float_buffers, self._batch_halves()),
                        **known}
            return settings, (f"not recorded; inferred from {os.path.join(self.output_folder, 'debug.json')}, written "
                              f"when the session that trained its last epoch started, and from the weights' shapes")
        if self.skcdf_release is not None:
            return {**self.skcdf_settings(), **known}, (
                f"not recorded; taken as {type(self).__name__}'s (release {self.skcdf_release}, which the trainer "
                f"name declares), checked against the weights' shapes")
        return None, why

    def _trusted_debug_settings(self) -> Tuple[Optional[dict], str]:
        """(raw settings, '') from the output folder's debug.json if it predates the checkpoint's last epoch;
        (None, why not) otherwise."""
        path = os.path.join(self.output_folder, "debug.json")
        if not os.path.isfile(path):
            return None, f"there is no debug.json in {self.output_folder}"
        settings = S.settings_from_debug_json(path)
        ends = self.logger.local_logger.my_fantastic_logging.get("epoch_end_timestamps", [])
        if settings is None:
            return None, f"{path} holds no SKCDF settings"
        if not S.debug_json_predates(path, ends):
            return None, (f"{path} was written after the checkpoint's last epoch ended (by a later session that "
                          f"saved no checkpoint, or a copy of the folder), so it need not describe the checkpoint")
        return settings, ""

    def _other_rules_message(self, diffs, settings: dict, source: str) -> str:
        name = type(self).__name__
        lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} in {name}" for k, a, b in diffs)
        net = self._net()
        bottleneck = net.skc.spatial_size if isinstance(net.skc, SKCModule) else None
        floats = net.decoders_have_float_buffers
        if source.startswith("not recorded; taken as"):  # only the shapes are known: the releases they fit
            fix = self._release_list(S.release_candidates(settings, bottleneck, floats, keys=S.SHAPE_SETTINGS))
        else:
            fix = self._exact_fix(settings, bottleneck, floats)
        return (f"nnUNetv2_train --c would continue this run with other training rules than it was trained with "
                f"(the checkpoint's settings: {source}):\n{lines}\n{fix} Prediction and --val need no change.")

    def _exact_fix(self, settings: dict, bottleneck, floats: bool) -> str:
        matches = S.release_candidates(settings, bottleneck, floats, batch=self._batch_halves())
        if matches:
            also = f" (identical on this network: {', '.join(matches[1:])})" if len(matches) > 1 else ""
            return (f"To finish it unchanged, resume it with {matches[0]} ({S.written_by(matches[0])}){also}: "
                    f"{self._commands(matches[0])}")
        closest, rest = S.closest_release(settings, bottleneck, floats, self._batch_halves())
        pins = ", ".join(f"{k} = {a!r}" for k, a, _ in rest)
        return (f"No shipped trainer has exactly these settings; the closest is {closest}, which differs in {pins}. "
                f"To finish it unchanged, define a subclass of {closest} that sets those (class attributes for skc_* "
                f"and the other architecture switches, __init__ for the training rules; e.g. the ablation variant "
                f"first: class MyTrainer(SKCDFTrainer_<variant>, {closest})) in a folder added to nnUNet_extTrainer, "
                f"then {self._commands('MyTrainer')}")

    def _unknown_settings_message(self, why: str) -> str:
        net = self._net()
        bottleneck = net.skc.spatial_size if isinstance(net.skc, SKCModule) else None
        shapes = net.architecture()
        fitting = S.release_candidates(shapes, bottleneck, net.decoders_have_float_buffers, keys=S.SHAPE_SETTINGS)
        return (f"the checkpoint records no SKCDF settings (it was written before they were recorded) and {why}, so "
                f"the rules it was trained with are not known for certain. {self._release_list(fitting)} "
                f"Prediction and --val need no change.")

    def _release_list(self, names: List[str]) -> str:
        releases = [n for n in names if n in S.RELEASE_TRAINERS]
        if not releases:
            return ("None of the release trainers builds the architecture of these weights (an ablation variant): "
                    "resume it with a subclass that puts the variant ahead of the release trainer it started under, "
                    "e.g. class MyTrainer(SKCDFTrainer_<variant>, SKCDFTrainer_v04), in a folder added to "
                    f"nnUNet_extTrainer, then {self._commands('MyTrainer')}")
        listed = "\n".join(f"  {n}: {S.RELEASE_TRAINERS[n]['written_by']}" for n in releases)
        return (f"Resume it with the trainer of the release that started the run (documentation/migration.md, "
                f"resume matrix); these fit the weights' architecture:\n{listed}\n"
                f"For the first one: {self._commands(releases[0])}")

    def _commands(self, trainer: str) -> str:
        """How to continue this model folder with ``trainer``."""
        base = os.path.basename(os.path.normpath(self.output_folder_base))
        new = f"{trainer}__{self.plans_manager.plans_name}__{self.configuration_name}"
        return (f"rename the model folder {base} to {new} and run nnUNetv2_train {self.plans_manager.dataset_name} "
                f"{self.configuration_name} {self.fold} -tr {trainer} --c (or start a new run).")

    def _remove_stale_checkpoint_temporaries(self) -> None:
        """Temporary checkpoint files of a run killed while saving (the checkpoints themselves are intact)."""
        if self.local_rank == 0 and os.path.isdir(self.output_folder):
            for name in os.listdir(self.output_folder):
                if ".pth.tmp" in name:
                    os.remove(os.path.join(self.output_folder, name))

    def _init_class_keep_rates(self):
        """Voxel counts per class over the fold's labelled training cases, once; stored as a network buffer so
        that checkpoints carry them (a resumed run keeps the counts it started with)."""
        net = self._net()
        if int(net.class_voxel_counts.sum()) == 0:
            tr_keys, _ = self.do_split()
            dataset = self.dataset_class(self.preprocessed_dataset_folder, tr_keys)
            counts = C.count_class_voxels((dataset.load_case(k)[1][:] for k in tr_keys),
                                          self.label_manager.num_segmentation_heads)
            net.class_voxel_counts.copy_(torch.as_tensor(counts))
        counts = net.class_voxel_counts.cpu().numpy()
        self.class_keep_rates = C.keep_rates_from_counts(counts).to(self.device)
        absent = [i for i, n in enumerate(counts) if n == 0]
        self.print_to_log_file(f"SKCDF class keep-rates: {np.round(self.class_keep_rates.cpu().numpy(), 4).tolist()}"
                               + (f" (classes {absent} absent from the labelled cases: rate 1)" if absent else ""))

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed over ``filename``: a run killed while
        saving leaves the previous checkpoint intact, never a truncated one (``--c`` resumes from it). The
        checkpoint holds everything SKCDF needs to continue exactly: network (with D_u's EMA state, the class
        voxel counts behind the keep-rates and the settings record), optimiser, grad scaler, epoch (which fixes
        learning rate, ramp-up weight and keep-rate annealing) and the logs."""
        tmp = f"{filename}.tmp{os.getpid()}"
        if self.network is not None:  # settings changed after initialize are the ones trained with
            self._net().training_record = self._training_record()
        try:
            super().save_checkpoint(tmp)  # writes only on rank 0 and unless checkpointing is disabled
            if os.path.isfile(tmp):
                os.replace(tmp, filename)
        finally:
            if os.path.isfile(tmp):
                os.remove(tmp)

    # ------------------------------------------------------------------------------------------ training step
    def train_step(self, batch: dict) -> dict:
        x_l = batch["data"].to(self.device, non_blocking=True)
        y_l = _to_device(batch["target"], self.device)
        unlabelled = next(self.dataloader_unlabeled)
        x_u = unlabelled["data"].to(self.device, non_blocking=True)
        # the student's view (opt-in) was perturbed by the loader, on the CPU; None: D_u reuses x_u's features
        x_u_view = self._student_view(unlabelled)
        # opt-in: labelled samples take on unlabelled cases' intensities; identity at 0 (the reference)
        x_l = self._transfer_appearance(x_l, batch["keys"], x_u, unlabelled["keys"])
        # opt-in: boxes of labelled samples pasted into unlabelled ones (none at 0, the reference)
        boxes = C.paste_boxes(x_u.shape[0], x_u.shape[2:], self.copy_paste, self.copy_paste_size)
        x_u = C.copy_paste(x_u, x_l, boxes)
        if x_u_view is not None:
            x_u_view = C.copy_paste(x_u_view, x_l, boxes)
        net = self._net()

        self.optimizer.zero_grad(set_to_none=True)
        net.ema_update(self.ema_momentum, self.ema_couple_decoders, self._head_ema_momentum(), self.ema_buffers)
        lam = self._consistency_weight()
        rates_u = C.annealed_keep_rates(self.class_keep_rates, self.current_epoch, self.num_epochs)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = self.network(x_l, x_u, x_u_view)  # through the DDP / compile wrappers: one forward, one backward
            l_sup = self.loss(out.main, y_l) + self._balanced_loss(out.balanced, y_l, self.class_keep_rates)
            p, p_b = C.pseudo_labels(out.main_u), C.pseudo_labels(out.balanced_u)
            # inside a pasted box D_u learns the labelled sample's true labels (no box: p and p_b themselves)
            t_u, t_u_b = (C.paste_targets(t, y_l, boxes, x_u.shape[2:]) for t in (p, p_b))
            # opt-in: unconfident pseudo-label voxels leave D_u's losses (None: every voxel, the reference)
            c_u, c_u_b = (self._confident(logits, boxes, x_u.shape[2:]) for logits in (out.main_u, out.balanced_u))
            l_u = self._unlabelled_main_loss(out.unlabelled_main, t_u, c_u) + self._balanced_loss(
                out.unlabelled_balanced, t_u_b, rates_u, c_u_b)
            loss = l_sup + lam * l_u
        self._backward(loss)  # queued before the host sync below, so the GPU keeps working meanwhile
        # the pseudo labels' classes outside pasted boxes (inside, D_l saw the labelled sample's content)
        histogram = C.class_histogram(C.outside_boxes(_first(p), boxes), self.label_manager.num_segmentation_heads)
        outputs = {"loss": loss.detach().cpu().numpy(), "l_sup": l_sup.detach().cpu().numpy(),
                   "l_u": l_u.detach().cpu().numpy(), "pseudo_histogram": histogram.cpu().numpy()}
        if c_u is not None:  # the share of D_u's full-resolution voxels the filter kept, main and balanced head
            outputs["pseudo_confident"] = _first(c_u).float().mean().cpu().numpy()
            outputs["pseudo_confident_balanced"] = _first(c_u_b).float().mean().cpu().numpy()
        # the host copy above is nnU-Net's own once-per-step sync (it logs the loss); the check reuses it
        if self._loss_is_finite(outputs["loss"]):
            self.nonfinite_in_a_row = 0
            self._optimizer_step()
        else:  # gradients dropped: no optimiser or scaler step (the EMA copies moved at the step's start)
            self.optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite_step(outputs)
        return outputs

    def _student_view(self, unlabelled: dict) -> Optional[torch.Tensor]:
        """The perturbed copy of x_u that D_u learns on (``unlabelled_view = "strong_intensity"``), moved to the
        device, or None (the reference: D_u reuses x_u's encoder features)."""
        if self._setting("unlabelled_view") == "same":
            return None
        if "data_view" not in unlabelled:
            raise RuntimeError(f"{type(self).__name__}: unlabelled_view = 'strong_intensity' was set after the "
                               f"unlabelled loader started; set it in __init__")
        return unlabelled["data_view"].to(self.device, non_blocking=True)

    def _head_ema_momentum(self) -> float:
        """m_h of the head EMA (main head <- balanced head). "lr_scaled" (default): the step (1 - m) follows the
        schedule (lr / initial lr), as an SGD step would; "constant": the reference's m every iteration, whatever
        the learning rate, so that once nnU-Net's poly schedule has annealed SGD's pull the main heads converge to
        the balanced ones and over-segment the rare organs (BENCHMARKS_FINDINGS.md, items 4-8: the
        reason for the 0.3.0 default); "off": 1.0, no head EMA."""
        mode = self._setting("head_ema")
        if mode == "constant":
            return self.ema_momentum
        if mode == "off":
            return 1.0
        return 1.0 - (1.0 - self.ema_momentum) * self.optimizer.param_groups[0]["lr"] / self.initial_lr

    def _consistency_weight(self) -> float:
        """lambda(t); ``rampup_epochs`` None = ramp over all epochs, 0 = full weight from the start."""
        ramp = self.num_epochs if self.rampup_epochs is None else self.rampup_epochs
        return C.consistency_weight(self.current_epoch, ramp, self.consistency_weight)

    def _loss_is_finite(self, loss_value: np.ndarray) -> bool:
        """Finite on every rank (DDP: one tiny all-reduce, so that all ranks skip, count and stop together)."""
        finite = bool(np.isfinite(loss_value))
        if self.is_ddp:
            flag = torch.tensor([int(finite)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item())
        return finite

    def _count_nonfinite_step(self, outputs: dict) -> None:
        """A NaN/inf loss (on any rank) was skipped: logged; training stops after ``max_nonfinite_steps`` in a
        row, keeping the last checkpoint."""
        self.nonfinite_in_a_row += 1
        self.print_to_log_file(f"non-finite loss in epoch {self.current_epoch} (L_sup {outputs['l_sup']}, L_u "
                               f"{outputs['l_u']} on rank {self.local_rank}): step skipped, no optimiser step (the "
                               f"EMA of D_u and the main heads ran at the step's start) ({self.nonfinite_in_a_row} "
                               f"in a row)")
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row: training stopped (checkpoint_latest.pth in "
                f"{self.output_folder} holds the last saved state; resume with --c). Usual causes: NaN/inf in the "
                f"preprocessed images (rerun nnUNetv2_plan_and_preprocess / skcdf_preprocess_unlabeled, which "
                f"check them), a learning rate too high for this dataset, or fp16 overflow (compare a run with "
                f"-device cpu, which trains without AMP).")

    def _confident(self, logits, boxes, full) -> Optional[list]:
        """The voxels whose pseudo label passes ``pseudo_label_threshold`` (per scale), pasted boxes always in;
        None without a threshold."""
        keep = C.confident(logits, self.pseudo_label_threshold)
        if keep is None:
            return None
        return C.paste_targets(keep, _apply(torch.ones_like, keep), boxes, full)

    def _unlabelled_main_loss(self, logits, target, keep):
        """DC+CE of D_u's main head on its targets; with a confidence filter, the dropped voxels get the ignore value
        that nnU-Net's loss leaves out of CE and Dice (the masked loss instance)."""
        if keep is None:
            return self.loss(logits, target)
        return self.masked_loss(logits, _apply2(lambda t, k: C.masked_target(t, k, self.mask_ignore_value),
                                                target, keep))

    def _balanced_loss(self, logits, target, rates: torch.Tensor, confident=None):
        """DC+CE on the balanced head with a class-balanced Bernoulli mask drawn per voxel and scale
        (0 without balanced heads: the no-ABC ablation); ``confident`` (per scale) also drops the voxels a
        confidence filter left out."""
        if logits is None:
            return 0.0
        keep = _apply(lambda t: C.balanced_mask(t, rates), target)
        if confident is not None:
            keep = _apply2(lambda k, c: k & c, keep, confident)
        if self._setting("masking") == "multiply":
            return self.loss(*C.multiply_mask(logits, target, keep))
        masked = _apply2(lambda t, k: C.masked_target(t, k, self.mask_ignore_value), target, keep)
        return self.masked_loss(logits, masked)

    def _backward(self, loss: torch.Tensor) -> None:
        """nnU-Net's backward: through the GradScaler with AMP on CUDA, plain fp32 otherwise. It runs even for a
        non-finite loss, so that DDP's gradient all-reduce stays in step on every rank."""
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def _optimizer_step(self) -> None:
        """Exactly nnU-Net's update: unscale + clip 12 + scaler step/update with AMP, clip 12 + step otherwise."""
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        finite = [o for o in train_outputs if np.isfinite(o["loss"])]  # skipped steps leave the epoch means
        if len(finite) < len(train_outputs):
            self.print_to_log_file(f"{len(train_outputs) - len(finite)} of {len(train_outputs)} steps of this "
                                   f"epoch skipped for a non-finite loss")
        train_outputs = finite or train_outputs
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        l_sup, l_u, histogram = np.mean(outputs["l_sup"]), np.mean(outputs["l_u"]), outputs["pseudo_histogram"].sum(0)
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (l_sup, l_u, histogram))
            l_sup, l_u = np.mean([g[0] for g in gathered]), np.mean([g[1] for g in gathered])
            histogram = np.sum([g[2] for g in gathered], axis=0)
        fractions = (histogram / max(histogram.sum(), 1)).tolist()
        lam = self._consistency_weight()
        for key, value in (("train_l_sup", l_sup), ("train_l_u", l_u), ("consistency_weight", lam)):
            self.logger.log(key, value, self.current_epoch)
        self._log_pseudo_label_fractions(fractions)
        self.print_to_log_file(f"L_sup {l_sup:.4f}  L_u {l_u:.4f}  lambda {lam:.4f}")
        self.print_to_log_file("pseudo-label class fractions (%)", [round(100 * f, 3) for f in fractions])
        if "pseudo_confident" in outputs:  # this process's steps (a diagnostic line; DDP ranks differ slightly)
            self.print_to_log_file(f"pseudo-label voxels kept by the confidence filter: "
                                   f"{100 * np.mean(outputs['pseudo_confident']):.1f} % (main head), "
                                   f"{100 * np.mean(outputs['pseudo_confident_balanced']):.1f} % (balanced head)")

    def _log_pseudo_label_fractions(self, fractions: List[float]) -> None:
        """The local logger keeps the list (checkpoints, ``--c``); the other loggers of nnU-Net's MetaLogger (W&B
        with ``nnUNet_wandb_enabled=1``) get one curve per class, ``pseudo_label_fractions/<label name>``.
        MetaLogger would expand the list itself as ``class_1, class_2, ...``, which suits its foreground-only
        Dice lists, but here index 0 is the background: ``class_1`` would name the background and ``class_7``
        the liver (label 6)."""
        self.logger.local_logger.log("pseudo_label_fractions", fractions, self.current_epoch)
        names = {int(v): k for k, v in self.dataset_json["labels"].items()}  # classes, not regions (refused)
        for logger in self.logger.loggers:
            for label, value in enumerate(fractions):
                logger.log(f"pseudo_label_fractions/{names.get(label, label)}", value, self.current_epoch)


# ---------------------------------------------------------------------------------------------- list helpers
def _to_device(x, device):
    return [i.to(device, non_blocking=True) for i in x] if isinstance(x, list) else x.to(device, non_blocking=True)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def _apply(fn, x):
    return [fn(i) for i in x] if isinstance(x, (list, tuple)) else fn(x)


def _apply2(fn, x, y):
    return [fn(i, j) for i, j in zip(x, y)] if isinstance(x, (list, tuple)) else fn(x, y)

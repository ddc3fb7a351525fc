"""The paper's ablations, one ``-tr`` away: each variant changes exactly one part of ``SKCDFTrainer``.

Architecture switches are class attributes (``build_network_architecture`` is a classmethod, called on the
class by nnU-Net's predictor, so a checkpoint is always rebuilt with its own variant's architecture);
training switches are set in ``__init__``. The README's ablation table maps every variant to what it tests
and to the paper table it reproduces. Combine with a training length by subclassing, e.g.
``class SKCDFTrainer_noSKC_100epochs(SKCDFTrainer_noSKC)`` with ``self.num_epochs = 100``.
"""
import torch

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer


def _hyperparameter_variant(name: str, doc: str, **values) -> type:
    """A subclass whose ``__init__`` sets instance hyperparameters after its parents' ``__init__`` (nnU-Net rebuilds
    a trainer's init kwargs from the exact base signature, so the signature is spelt out). The parent is reached
    through ``super()``, so a variant used as a mixin ahead of another one (``class X(SKCDFTrainer_excludeMask,
    SKCDFTrainer_cw1)``) keeps the other's settings as well."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super(variant, self).__init__(plans, configuration, fold, dataset_json, device)
        for key, value in values.items():
            setattr(self, key, value)

    variant = type(name, (SKCDFTrainer,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})
    return variant


# ---------------------------------------------------------------------------------------------- SKC module
class SKCDFTrainer_noSKC(SKCDFTrainer):
    """No SKC module: the encoder's bottleneck goes straight to the decoders (no attention parameters)."""
    skc_enabled = False


class SKCDFTrainer_selfAttention(SKCDFTrainer):
    """Self- instead of cross-attention in the labelled pass (supplement Table 6): labelled and unlabelled
    samples no longer exchange information in the SKC module."""
    labelled_attention_mode = "self"


class SKCDFTrainer_globalLocal(SKCDFTrainer):
    """Global block before the local one (supplement Table 5 d)."""
    skc_order = "global_local"


class SKCDFTrainer_parallelSKC(SKCDFTrainer):
    """Local and global blocks side by side, outputs summed (a parallel fusion, cf. supplement Table 5 e)."""
    skc_order = "parallel"


class SKCDFTrainer_divisorWindow(SKCDFTrainer):
    """Local windows that divide the bottleneck (largest divisor <= 2 per axis, 1 on odd axes), no padding: the
    rule before commit f152b61 (release 0.1.0, and 0.2.0 until padding landed), with today's other defaults. On odd
    bottlenecks a smaller local block than the reference's 2x2x2 windows. Identical to SKCDFTrainer on even
    bottlenecks. Runs of that time resume unchanged under SKCDFTrainer_v01, which pins all of their settings."""
    skc_window = "divisor"


class SKCDFTrainer_perHeadSelf(SKCDFTrainer):
    """The reference code's self mode (unlabelled pass, inference): h separate K x K score matrices, each
    normalised and softmaxed on its own, instead of one joint hK x hK matrix (cross mode stays joint)."""
    skc_self_heads = "per_head"


class SKCDFTrainer_attnDropout(SKCDFTrainer):
    """The reference code's extra dropout (0.1) on the attention weights."""
    skc_attention_dropout = 0.1


# ---------------------------------------------------------------------------------------------- ABC heads
class SKCDFTrainer_noABC(SKCDFTrainer):
    """No auxiliary balanced classifier: main heads only, no balanced masks, no head EMA."""
    balanced_heads = False


SKCDFTrainer_multiplyMask = _hyperparameter_variant(
    "SKCDFTrainer_multiplyMask", "The reference implementation's masking: masked voxels become zero logits with a "
    "background target, instead of leaving the loss. SKCDFTrainer's default since 0.4.0; this name pins it (and "
    "keeps model folders trained under it predicting and resumable).", masking="multiply")
SKCDFTrainer_excludeMask = _hyperparameter_variant(
    "SKCDFTrainer_excludeMask", "Masked voxels leave CE and Dice (nnU-Net's ignore-label path), so the balanced "
    "losses act at full strength on the kept voxels: SKCDFTrainer's default up to 0.3 (SKCDFTrainer_v03 pins all of "
    "0.3's settings and resumes its runs unchanged).", masking="exclude")


# ---------------------------------------------------------------------------------------------- decoupling / EMA
class SKCDFTrainer_noDecoupling(SKCDFTrainer):
    """One decoder learns from labels and from pseudo labels (D_u is D_l): ordinary pseudo-label training
    with SKC and ABC, the setting the decoupling is meant to improve on."""
    decoupled = False


SKCDFTrainer_noEMA = _hyperparameter_variant(
    "SKCDFTrainer_noEMA", "Two decoders without the EMA coupling D_u <- D_l (D_u learns from pseudo labels only); "
    "the head EMA (main head <- balanced head) stays.", ema_couple_decoders=False)


# ---------------------------------------------------------------------------------------------- hyperparameters
SKCDFTrainer_cw0 = _hyperparameter_variant(
    "SKCDFTrainer_cw0", "Consistency weight w = 0: no unlabelled loss. The unlabelled images still enter the labelled "
    "pass through the SKC cross-attention; D_u (the decoder prediction uses) gets no gradient and follows D_l by "
    "its EMA (and nnU-Net's weight decay); the unlabelled pass is still computed, so a step costs as much as "
    "SKCDFTrainer's. Measures what the unlabelled loss adds.",
    consistency_weight=0.0)
SKCDFTrainer_cw1 = _hyperparameter_variant(
    "SKCDFTrainer_cw1", "Consistency weight w = 1 (reference 10).", consistency_weight=1.0)
SKCDFTrainer_cw5 = _hyperparameter_variant(
    "SKCDFTrainer_cw5", "Consistency weight w = 5 (reference 10).", consistency_weight=5.0)
SKCDFTrainer_cw20 = _hyperparameter_variant(
    "SKCDFTrainer_cw20", "Consistency weight w = 20 (reference 10).", consistency_weight=20.0)
SKCDFTrainer_noRampup = _hyperparameter_variant(
    "SKCDFTrainer_noRampup", "Full consistency weight from the first epoch (no ramp-up).", rampup_epochs=0)
SKCDFTrainer_rampup50 = _hyperparameter_variant(
    "SKCDFTrainer_rampup50", "Ramp-up over the first 50 epochs instead of the whole training.",
    rampup_epochs=50)
SKCDFTrainer_ema09 = _hyperparameter_variant(
    "SKCDFTrainer_ema09", "EMA momentum m = 0.9 (reference 0.99).", ema_momentum=0.9)
SKCDFTrainer_ema0999 = _hyperparameter_variant(
    "SKCDFTrainer_ema0999", "EMA momentum m = 0.999 (reference 0.99).", ema_momentum=0.999)
SKCDFTrainer_constantHeadEMA = _hyperparameter_variant(
    "SKCDFTrainer_constantHeadEMA", "The reference's head EMA (main head <- balanced head) with the constant m every "
    "iteration, whatever the learning rate: SKCDFTrainer's default up to 0.2. With nnU-Net's annealed schedule the "
    "main heads end up absorbed by the balanced heads.", head_ema="constant")
SKCDFTrainer_lrScaledHeadEMA = _hyperparameter_variant(
    "SKCDFTrainer_lrScaledHeadEMA", "Head EMA (main head <- balanced head) whose step (1 - m) follows the learning "
    "rate (x lr / initial lr): with nnU-Net's annealed schedule the main heads are no longer absorbed by the "
    "balanced heads at the end of training. D_u <- D_l keeps the constant m. SKCDFTrainer's default since 0.3.0; "
    "this name pins it (and keeps model folders trained under it predicting).", head_ema="lr_scaled")
SKCDFTrainer_noHeadEMA = _hyperparameter_variant(
    "SKCDFTrainer_noHeadEMA", "No head EMA: the main heads learn from their own losses only; the balanced heads "
    "act through the shared decoder features. D_u <- D_l keeps its EMA.", head_ema="off")
SKCDFTrainer_strongView = _hyperparameter_variant(
    "SKCDFTrainer_strongView", "Extension (not in the reference): D_u learns the pseudo labels of x_u on a copy of "
    "x_u perturbed by nnU-Net's intensity transforms at high probability (unlabelled_view='strong_intensity').",
    unlabelled_view="strong_intensity")
SKCDFTrainer_histMatch = _hyperparameter_variant(
    "SKCDFTrainer_histMatch", "Extension (not in the reference): each labelled sample, with probability 0.5, is "
    "mapped from its case's intensity distribution onto that of the case of an unlabelled sample of the same step "
    "(appearance_transfer=0.5; whole-case quantiles above the clipped minimum): the labelled images take on the "
    "intensity distributions of the unlabelled ones (another site's contrast phase, dose, calibration) while their "
    "labels stay valid. Costs reading each case once and one table look-up per matched sample.",
    appearance_transfer=0.5)
SKCDFTrainer_copyPaste = _hyperparameter_variant(
    "SKCDFTrainer_copyPaste", "Extension (not in the reference): every unlabelled sample gets a box of a labelled "
    "sample pasted in at the same position (2/3 of the patch along each axis, as bidirectional copy-paste, BCP, "
    "CVPR 2023, does in its labelled-into-unlabelled direction; copy_paste=1.0). The mixed images replace x_u in "
    "the whole step: the labelled pass's cross-attention reads them and the pseudo labels come from them, and D_u "
    "learns the labelled sample's true labels inside the box and the pseudo labels outside: the decoder used at "
    "inference gets labelled anatomy in unlabelled images' context. No extra forward pass.", copy_paste=1.0)
SKCDFTrainer_confidence = _hyperparameter_variant(
    "SKCDFTrainer_confidence", "Extension (not in the reference): pseudo-label voxels whose softmax maximum (of the "
    "D_l head that made them) is below 0.95 leave D_u's losses, main and balanced head, at every deep-supervision "
    "scale (pseudo_label_threshold=0.95, as FixMatch's confidence threshold; the main head's through nnU-Net's "
    "ignore path, the balanced head's through its class-balanced mask). Pasted boxes (copy_paste) always stay. A "
    "line of the training log says which share of the voxels each head kept.",
    pseudo_label_threshold=0.95)
SKCDFTrainer_crossWholeBatch = _hyperparameter_variant(
    "SKCDFTrainer_crossWholeBatch", "Cross-attention over the whole other half of the batch (skc_cross_group=None: "
    "every labelled sample reads all unlabelled samples and back), the rule up to 0.4. Identical to SKCDFTrainer at "
    "a batch of 2 per half (the reference's, nnU-Net's 3D plans); on larger batches (2D plans) its attention costs "
    "grow with the batch squared.", skc_cross_group=None)

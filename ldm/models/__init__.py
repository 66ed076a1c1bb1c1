"""The training recipe: one LightningModule (`asym_decoder.py`: frozen encoder, trainable asymmetric decoder, L1 +
LPIPS + PatchGAN) that receives its networks as arguments, whatever their family, and `nonfinite.py`.
Imports ldm/modules/ (common.py and losses.py, never a family), ldm/metrics.py and data/."""

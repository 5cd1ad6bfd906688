"""The trainer: model loading, packing, losses, FSDP2, checkpoints and export; `train.main` is the process.

Modules by job: model (loading), attention (varlen CPU attention), packing, losses, optim, world (torchrun
and FSDP2), ckpt, export (Hugging Face directory), metrics, train (the step loop).
"""

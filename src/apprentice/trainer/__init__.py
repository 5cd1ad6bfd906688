"""The trainer: model loading, packing, losses, FSDP2, checkpoints and export; `train.main` is the process.

Modules by job: model (loading the student), precision (trainer.precision), parallelize (activation
checkpointing, compile, FSDP2), logprobs (the chunked lm_head loss), attention (varlen CPU attention),
packing, losses, optim, world (torchrun, process group, collectives), ckpt, export (Hugging Face directory),
metrics, train (the step loop).
"""

"""Everything apprentice's processes hand each other on disk, in one place (layout: handoff/paths.py).

    rollouts.py  orchestrator -> trainer   OUTPUT/rollouts/step_{n}/      step batches (safetensors columns)
    progress.py  trainer -> orchestrator   OUTPUT/trainer/progress.json   the last finished step (backpressure)
    weights.py   trainer -> server         OUTPUT/weights/step_{n}/       published weights (rl mode)
    hfdir.py     the one Hugging Face directory writer (weights/step_{n} and OUTPUT/final)
    manifest.py  MANIFEST.json: size + sha256 of every file of a directory hand-off (weights, checkpoints)
    paths.py     the paths, the COMPLETE marker, setting a damaged hand-off aside
(OUTPUT/checkpoints/step_{n}/ is the trainer's own state: trainer/ckpt.py, on these paths and this manifest.)

One weight update, from the trainer's step to the server sampling with it (one verb per act):

    1. publish   trainer/train.py, after optimizer step n: `weights.publish` writes OUTPUT/weights/step_{n}
                 (hfdir.write_hf_dir: save, MANIFEST.json, COMPLETE last, atomic rename).
    2. reload    orchestrator/policy.py, before batch m opens: `PolicySync.reload_newest` polls
                 `weights.latest_published` until step >= m - 1 - bound, then `PolicySync.reload(n)` asks the
                 server through its backend, `Backend.reload` (inference/backends.py): `POST /v1/load_weights`
                 (apprentice serve) or vLLM's `collective_rpc` of `WeightReloader.reload` (inference/vllm_worker.py).
    3. verify    in the server (inference/server.py `reload` -> `load_published`): `weights.verify` checks the
                 marker and every file against the manifest; a damaged directory is set aside, one line.
    4. load      `apprentice.loader.load_causal_lm`, in the served model's dtype and device.
    5. swap      `BatchEngine.swap` (inference/engine.py): requests admitted afterwards sample the new weights.

With `trainer.weight_broadcast = "collective"` the tensors of step 1 travel over a process group instead
(trainer/broadcast.py -> inference/collective.py, staged in the server; published to disk only where a
checkpoint follows), and in step 2 `PolicySync.reload` applies the staged step (`POST /v1/weights/apply`),
which ends in the same swap.

A trainer resuming from checkpoint n `weights.republish`es step n when its weights are missing or damaged, and
the launcher starts the server on `weights.latest_verified`: no rerun waits for weights that will not come.

This package imports nothing from trainer/, orchestrator/ or inference/: every process reads it, none owns it.
"""

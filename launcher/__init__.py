"""Hydra + torchrun apps that save and load Hugging Face checkpoints through :mod:`hf_storage`.

    torchrun --nproc-per-node=8 -m launcher.save +model=llama output.dir=/ckpt/step-1000
    torchrun --nproc-per-node=8 -m launcher.load +model=llama source.path=/ckpt/step-1000 compare=random
    torchrun --nproc-per-node=8 -m launcher.save +model=llama output.dir=s3://my-bucket/ckpt/step-1000

Modules: ``save`` / ``load`` (the Hydra apps), ``config`` (schemas in the ConfigStore), ``models``
(architectures as FQNs and shapes), ``sources`` (random | dcp | hf), ``titan`` (torchtitan <-> HF key
adapter), ``dist`` (world checks, process groups, device mesh and placements), ``placement`` (NVML, GPUs,
CPU affinity, memory checks), ``session`` (the steps both apps share), ``locations`` (a checkpoint's
directory or ``s3://`` URI), ``jobs`` (Slurm / Kubernetes / local job rendering), ``verify``.
"""

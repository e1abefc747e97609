"""adm-megatron: Adversarial Distribution Matching distillation of diffusion transformers on
megatron-core.  CI installs the exact versions in requirements-ci.txt; the ranges here are the
ones the code is written for."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="adm-megatron",
    version="0.1.0",
    description="ADM / ADP / DMD diffusion distillation trainer on megatron-core",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=("tests", "tests.*", "tools", "tools.*", "examples", "examples.*")),
    python_requires=">=3.11",
    install_requires=[
        # no upper pins: megatron-core 0.17+ needs Python >= 3.12 and a newer torch, and both are
        # meant to work (checked: 0.16.1 on 3.11 / torch 2.13; 0.19.2, and 0.17.1 for what differs,
        # on 3.12 / torch 2.11; adm_megatron/mcore_compat.py); torch itself is best installed first
        # (CPU wheel or the cluster's CUDA build)
        # floors below which the code cannot work (megatron-core 0.16's own torch floor; diffusers'
        # apply_rotary_emb(sequence_dim=) since 0.35; transformers' SamVisionModel since 4.51); the
        # oldest tried together: README "Checked"
        "torch>=2.6",
        "megatron-core>=0.16",
        "diffusers>=0.35",
        "transformers>=4.51",
        "einops>=0.7",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "psutil>=5.9",
        "wandb>=0.17",
        "imageio>=2.31",
        "imageio-ffmpeg>=0.5",
        "tqdm>=4.66",
        "rich>=13",
        "sentencepiece>=0.2",
    ],
    extras_require={
        # Transformer Engine kernels (BF16 / FP8, TE attention with context parallel); needs CUDA
        "te": ["transformer-engine[pytorch]"],
        # model.fp8=tensorwise | rowwise | rowwise_with_gw_hp: torchao's FP8 GEMMs in the local spec
        "fp8": ["torchao>=0.16"],
        # logging.tensorboard: TensorBoard event files beside metrics.jsonl and wandb
        "tensorboard": ["tensorboard>=2.10"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "tensorboard>=2.10", "torchao>=0.16"],
    },
    entry_points={"console_scripts": ["adm-megatron = adm_megatron.cli:main"]},
)

from setuptools import find_packages, setup

setup(
    name="hpc-grpo",
    version="0.1.0",
    description="GRPO training of 70B-class language models on Slurm: FSDP2 trainers, vLLM rollouts, no Ray",
    python_requires=">=3.10",
    packages=find_packages(include=["hpc", "hpc.*", "grpo", "grpo.*", "grpo_kernels", "grpo_kernels.*"]),
    package_data={"grpo": ["sample_data/*"]},
    install_requires=[
        "torch>=2.6,<2.15",
        "transformers>=4.51,<6",
        "peft>=0.15,<1",
        "submitit>=1.5.2,<2",
        "triton>=3.2,<4; platform_system == 'Linux'",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "pyarrow>=15,<30",
        "math-verify>=0.8,<1",
        "PyYAML>=6,<7",  # --config files and the run folder's config.yaml
        "tensorboard>=2.14,<3",  # event files in the run folder (grpo.tracking)
    ],
    extras_require={
        "dev": ["pytest>=8,<10", "pytest-timeout>=2.3,<3"],
        "vllm": ["vllm>=0.24,<0.34"],
        "wandb": ["wandb>=0.17,<1"],  # track.wandb=true
    },
)

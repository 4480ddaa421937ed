from setuptools import find_packages, setup

setup(
    name="diffusers-pdmd",
    version="0.1.0.dev0",
    description="Phased DMD: few-step distribution matching distillation with one expert per SNR subinterval, "
    "native to diffusers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"diffusers_pdmd": ["assets/digits_teacher/*.json", "assets/digits_teacher/*/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42",
        "transformers>=4.51",
        "accelerate>=1.0",
        "huggingface_hub>=0.34",
        "peft>=0.17",
        "datasets>=3.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "demo": ["scikit-learn>=1.3", "matplotlib"],  # the digits teacher, its metrics and plots
        # diffusers' `export_to_video` (Wan2.2 samples as .mp4): imageio with its ffmpeg binary
        "video": ["imageio>=2.27", "imageio-ffmpeg>=0.4.9"],
        # `python -m diffusers_pdmd.evaluate`: RAFT optical flow and the LPIPS trunk (torchvision), the plot
        # (matplotlib); `--lpips_model alex` also needs `pip install lpips` (it ships LPIPS' calibrated heads)
        "eval": ["torchvision", "matplotlib"],
        "dev": [
            "pytest>=8",
            "pytest-xdist",
            "ruff>=0.6",
            "scikit-learn>=1.3",
            "matplotlib",
            "imageio>=2.27",  # the docs' Wan recipes are tested, `export_to_video` included
            "imageio-ffmpeg>=0.4.9",
            "tensorboard",
            "torchvision",  # the evaluation tests build tiny RAFT / LPIPS trunks
        ],
    },
)

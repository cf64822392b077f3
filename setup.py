from setuptools import find_packages, setup

setup(
    name="var-toolkit",
    version="0.1.0",
    description="Visual autoregressive image generation: VAR next-scale and next-token models, samplers, KV caches",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["var", "var.*"]),
    package_data={"var": ["assets/*", "assets/**/*"]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "pillow",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton"],
        "hub": ["huggingface_hub"],  # downloads released checkpoints by name (var.hub.download)
        # torch-fidelity imports torchvision, which must be the build made for the installed torch: name the pair on
        # the same pip command line (docs/install.md, "Evaluation extra"), or pip upgrades torch to the newest
        "eval": ["torch-fidelity>=0.4", "scipy"],
        "t2i": ["transformers>=4.40", "tokenizers", "sentencepiece"],  # text encoder of Infinity / LlamaGen T2I
        "dev": ["pytest", "scipy", "triton==3.8.0", "mkdocs>=1.6", "mkdocstrings[python]>=0.28", "transformers>=4.40",
                "tokenizers"],
    },
    entry_points={
        "console_scripts": [
            "var-train=var.cli.train:cli",
            "var-eval=var.cli.eval:cli",
            "var-bench=var.cli.bench:cli",
            "var-sample=var.cli.sample:cli",
        ],
    },
)

from setuptools import find_packages, setup

setup(
    name="megalong",
    version="0.1.0",
    description="LongLoRA-style context extension of Llama models on megatron-core",
    packages=find_packages(include=["megalong", "megalong.*"]),
    python_requires=">=3.11",
    install_requires=[
        # torch is installed first by tests/run.sh and examples/quickstart.sh (the CPU build);
        # the range here only admits what is already there.
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        "psutil",  # megatron-core's checkpoint writer processes need it (not a declared dependency)
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "matplotlib",
        "pyarrow",
    ],
    entry_points={"console_scripts": [
        f"megalong-{name}=megalong.cli.{module}:console" for name, module in (
            ("train", "train"), ("convert", "convert"), ("eval-ppl", "eval_ppl"),
            ("passkey", "passkey"), ("generate", "generate"), ("preprocess", "preprocess"),
            ("tokenizer", "tokenizer"), ("plan", "plan"), ("report", "report"))]},
    extras_require={
        "test": ["pytest", "pytest-timeout", "transformers>=4.45", "peft"],
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    },
)

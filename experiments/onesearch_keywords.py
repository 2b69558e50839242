r"""Writes a OneSearch-V2 keyword file (spec §2.3; format in `jax_hd.onesearch.keywords`) for the simulated world
of a OneSearch config, which `config.cot.keyword_file` then points at.

    python -m experiments.onesearch_keywords --config=experiments/configs/onesearch.py:cpu_demo \
        --out=runs/keywords.jsonl --source=simulator
    python -m experiments.onesearch_keywords --config=experiments/configs/onesearch.py:cpu_demo \
        --out=runs/keywords_llm.jsonl --hf_dir=/models/Qwen3-32B --batch_size=8 --max_sessions=2000

`--source=simulator` writes the world's own thoughts (one row per session). `--hf_dir` (a local Hugging Face causal
LM directory; nothing is downloaded) answers the three-step prompt of every session (profile, recent searches and
clicks; training sessions also list their clicked items) in batches; progress is saved atomically every
`--save_every` batches and rerunning the same command skips the sessions already answered (unparsable answers go to
`<out>.errors.json`, delete it to retry them). A summary is printed and written to `<out>.summary.json`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jax_hd.core import config as config_lib
from jax_hd.core import metrics
from jax_hd.onesearch import keywords, trainer


def run(
    config: ml_collections.ConfigDict,
    out_path: str,
    *,
    source: str = "simulator",
    hf_dir: str = "",
    max_sessions: int = -1,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    dtype: str = "float32",
    device: str = "cpu",
    save_every: int = 1,
    resume: bool = True,
    max_recent: int = 5,
    generate_fn: Any = None,
) -> dict[str, Any]:
    """Writes the keyword file of `config`'s world to `out_path`; returns the summary.

    source: "simulator" or "hf" (implied by `hf_dir`); max_sessions: the first N sessions of the log (-1: all);
    generate_fn: a prompts -> answers callable replacing the HF model (tests)."""
    if hf_dir:
        source = "hf"
    if source not in ("simulator", "hf"):
        raise ValueError(f"--source must be 'simulator' or 'hf', got {source!r}")
    if source == "hf" and not hf_dir and generate_fn is None:
        raise ValueError("--source=hf needs --hf_dir=<local causal LM directory>")
    if not out_path:
        raise ValueError("--out is required")
    trainer.check_config(config)
    world = trainer.simulated_world_of(config)
    n = len(world.log) if max_sessions < 0 else min(max_sessions, len(world.log))
    fingerprint = keywords.catalogue_fingerprint(world.catalog.item_ids.tolist())
    if source == "simulator":
        entries = keywords.simulator_entries(world.log, range(n))
        keywords.write_keyword_file(out_path, entries, catalogue=fingerprint, source=keywords.SIMULATOR_SOURCE)
        summary: dict[str, Any] = {"num_requests": n, "num_written": len(entries), "num_failed": 0, "num_resumed": 0}
        summary["out_path"] = out_path
    else:
        if generate_fn is None:
            generate_fn = keywords.HFKeywordLLM(hf_dir, max_new_tokens=max_new_tokens, dtype=dtype, device=device)
        requests = keywords.session_requests(world, range(n), max_recent=max_recent)
        query_types = {r.key: str(world.log.query_types[s]) for s, r in enumerate(requests)}
        summary = keywords.generate_keyword_file(
            requests, generate_fn, out_path, catalogue=fingerprint, source=os.path.abspath(hf_dir) if hf_dir else "hf",
            batch_size=batch_size, save_every=save_every, resume=resume, query_types=query_types,
        )  # fmt: skip
    summary.update(source=source if source == "simulator" else f"hf:{hf_dir}", catalogue=fingerprint)
    metrics.atomic_write_text(out_path + ".summary.json", json.dumps(summary, indent=2))
    print(
        f"{summary['num_written']}/{summary['num_requests']} rows written, {summary['num_failed']} failed, "
        f"{summary['num_resumed']} resumed -> {out_path}"
    )
    return summary


def main() -> None:
    config_flag = config_flags.DEFINE_config_file("config", None, "OneSearch config: path.py:preset.", lock_config=True)
    out = flags.DEFINE_string("out", None, "Output keyword file (.jsonl).")
    source = flags.DEFINE_enum("source", "simulator", ["simulator", "hf"], "Where the thoughts come from.")
    hf_dir = flags.DEFINE_string("hf_dir", "", "Local Hugging Face causal LM directory (implies --source=hf).")
    max_sessions = flags.DEFINE_integer("max_sessions", -1, "First N sessions of the log (-1: all).")
    batch_size = flags.DEFINE_integer("batch_size", 8, "Prompts per generate call.")
    max_new_tokens = flags.DEFINE_integer("max_new_tokens", 256, "Answer length cap (tokens).")
    dtype = flags.DEFINE_string("dtype", "bfloat16", "torch dtype of the LM.")
    device = flags.DEFINE_string("device", "cpu", "torch device of the LM.")
    save_every = flags.DEFINE_integer("save_every", 1, "Save progress every N batches.")
    resume = flags.DEFINE_bool("resume", True, "Skip sessions already in the output / errors file.")

    def _main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config_flag.value is None or not out.value:
            raise app.UsageError("--config and --out are required")
        try:
            run(
                config_flag.value, out.value, source=source.value, hf_dir=hf_dir.value,
                max_sessions=max_sessions.value, batch_size=batch_size.value, max_new_tokens=max_new_tokens.value,
                dtype=dtype.value, device=device.value, save_every=save_every.value, resume=resume.value,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"FATAL {type(e).__name__}: {e}")

    app.run(_main, flags_parser=config_lib.parse_flags)


if __name__ == "__main__":
    main()

"""One metric writer for every trainer: TensorBoard events, a JSONL file and a console progress bar.

Only process 0 writes (the others get a writer that does nothing), so multi-host runs log once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"


class _DropLibraryInfo(logging.Filter):
    """Drops INFO records that orbax and grain log on every save (they bury the progress bar)."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/_src/"))
        return record.levelno >= logging.WARNING or not noisy


def quiet_library_logs() -> None:
    """Keeps absl INFO logging for jax_hd but silences the libraries' per-save INFO chatter."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())


def _to_float(value: Any) -> float:
    return float(np.asarray(jax.device_get(value)))


def _truncate_jsonl(path: str, after_step: int) -> None:
    """Drops rows logged after `after_step` (by a run that died before its next checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", -1) <= after_step]
    if len(kept) != len(rows):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)


class MetricWriter:
    """Writes scalars to `<workdir>/metrics.jsonl`, `<workdir>/tensorboard/` and a tqdm progress bar.

    Args:
      workdir: run directory.
      total_steps: for the progress bar's ETA.
      start_step: the step a (resumed) run starts from; JSONL rows after it are dropped so a resumed run
        does not log a step twice.
      console_keys: scalars shown on the progress bar (all when None).
      enabled: defaults to `jax.process_index() == 0`.
    """

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        *,
        start_step: int = 0,
        console_keys: Sequence[str] | None = None,
        enabled: bool | None = None,
    ):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.console_keys = console_keys
        self.jsonl_path = os.path.join(workdir, METRICS_FILE)
        self._last_step = start_step
        self._last_time = time.perf_counter()
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter  # Heavy import, only on the writing process.

        os.makedirs(workdir, exist_ok=True)
        _truncate_jsonl(self.jsonl_path, start_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
        self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs `scalars` (python or jax scalars) for `step`; adds `steps_per_sec` since the last write."""
        if not self.enabled:
            return
        now = time.perf_counter()
        values = {k: _to_float(v) for k, v in scalars.items()}
        if step > self._last_step:
            values["steps_per_sec"] = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, int(step))
        shown = {k: v for k, v in values.items() if self.console_keys is None or k in self.console_keys}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self._bar.update(step - self._bar.n)
        self._last_step, self._last_time = step, now

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._tb.close()
        self._jsonl.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a temporary file in the same directory and a rename, so a reader
    never sees a torn file; creates the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` as indented JSON (numpy scalars as floats), atomically, from process 0 only."""
    if jax.process_index() == 0:
        atomic_write_text(path, json.dumps(payload, indent=2, default=float))


def read_json(path: str) -> dict:
    """The JSON object at `path`, or `{}` when the file does not exist."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_metrics(jsonl_path: str) -> list[dict]:
    """All rows of a metrics JSONL file; a malformed line raises ValueError naming the file and line."""
    rows = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{jsonl_path}:{line_number}: not a JSON object: {e}") from e
    return rows


def plot_metrics(jsonl_path: str, png_path: str, keys: Sequence[str] | None = None) -> list[str]:
    """Plots each key's curve against step (one panel per key) to `png_path`; returns the keys drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_metrics(jsonl_path)
    if keys is None:
        keys = sorted({k for row in rows for k in row if k not in ("step", "time")})
    keys = [k for k in keys if any(k in row for row in rows)]
    if not keys:
        raise ValueError(f"{jsonl_path} has none of the requested metrics")
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):  # Spare panels are blanked below.
        points = [(row["step"], row[key]) for row in rows if key in row]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return list(keys)

import json
import os

import jax.numpy as jnp
import pytest

from jax_hd.core import metrics


def _tensorboard_files(workdir):
    directory = os.path.join(workdir, "tensorboard")
    return [f for f in os.listdir(directory) if f.startswith("events.out.tfevents")]


def test_writer_fans_out_to_jsonl_tensorboard_and_console(tmp_path, capsys):
    with metrics.MetricWriter(str(tmp_path), total_steps=20, console_keys=("loss",), enabled=True) as writer:
        for step in range(1, 21):
            writer.write(step, {"loss": jnp.float32(1.0 / step), "lr": 0.1})
    rows = metrics.read_metrics(writer.jsonl_path)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[3]["loss"] == pytest.approx(0.25)
    assert rows[3]["lr"] == pytest.approx(0.1)
    assert "steps_per_sec" in rows[3] and rows[3]["steps_per_sec"] > 0
    assert _tensorboard_files(tmp_path)
    console = capsys.readouterr().err
    assert "20/20" in console and "loss=0.05" in console


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboardX.proto import event_pb2 as events

    with metrics.MetricWriter(str(tmp_path), total_steps=3, enabled=True) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": float(step)})
    path = os.path.join(tmp_path, "tensorboard", _tensorboard_files(tmp_path)[0])
    values = {}
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset < len(data):  # TFRecord framing: length (8), crc (4), payload, crc (4).
        length = int.from_bytes(data[offset : offset + 8], "little")
        event = events.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 16 + length
        for value in event.summary.value:
            values.setdefault(value.tag, {})[event.step] = value.simple_value
    assert values["loss"] == {1: 1.0, 2: 2.0, 3: 3.0}


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path):
    with metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True) as writer:
        for step in range(1, 8):
            writer.write(step, {"loss": float(step)})
    with metrics.MetricWriter(str(tmp_path), total_steps=10, start_step=5, enabled=True) as writer:
        for step in range(6, 11):
            writer.write(step, {"loss": 100.0 + step})
    rows = metrics.read_metrics(writer.jsonl_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["loss"] for r in rows][4:6] == [5.0, 106.0]


def test_disabled_writer_writes_nothing(tmp_path):
    with metrics.MetricWriter(str(tmp_path / "run"), total_steps=2, enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "run")


def test_plot_metrics_writes_a_png_with_one_panel_per_key(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "acc": s / 10}) + "\n" for s in range(1, 11)))
    png = tmp_path / "plots" / "curves.png"
    assert metrics.plot_metrics(str(path), str(png)) == ["acc", "loss"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics.plot_metrics(str(path), str(png), ["loss", "missing"]) == ["loss"]
    with pytest.raises(ValueError, match="has none of the requested metrics"):
        metrics.plot_metrics(str(path), str(png), ["missing"])


def test_malformed_metrics_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
        metrics.read_metrics(str(path))

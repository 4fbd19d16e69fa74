"""Feedback: JSON-lines metrics and the terminal progress bar."""

import io
import json

from kdprune_jax.train.metrics import MetricsWriter, ProgressBar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_metrics_jsonl(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write("student", 10, loss=0.5, accuracy=0.75)
    w.write("student", 20, loss=float("nan"))
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert lines[0]["step"] == 10 and lines[0]["loss"] == 0.5 and lines[0]["stage"] == "student"
    assert lines[1]["loss"] == "nan"  # valid JSON, not a bare NaN token


def test_progress_bar_shows_rate_and_eta():
    out = _Tty()
    bar = ProgressBar("student", total=100, images_per_step=64, stream=out)
    bar.t0 -= 10.0  # pretend 10 s have passed
    bar.update(50, "loss 1.0")
    bar.close()
    text = out.getvalue()
    assert "50/100" in text and "it/s" in text and "img/s" in text and "ETA 00:00:1" in text
    assert "loss 1.0" in text


def test_progress_bar_silent_without_terminal():
    out = io.StringIO()
    bar = ProgressBar("x", total=10, stream=out)
    bar.update(5)
    bar.close()
    assert out.getvalue() == ""

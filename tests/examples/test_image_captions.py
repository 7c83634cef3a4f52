"""`examples/image_captions.py` as its docstring says to run it: it builds a tiny random Qwen2.5-VL (with a real
image processor), `tinkerd serve` serves that, and main() trains captions on three tinted pictures and captions new
ones through the SDK's image chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples import image_captions
from tests.e2e.conftest import API_KEY, start_server, stop_server

# slow: about 2 minutes (40 training steps); the image path keeps its e2e tests in the default run (test_sdk_images.py)
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_example_builds_a_tiny_model_trains_and_captions_new_pictures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "tiny-vl"
    assert image_captions.main(["--make-tiny-model", str(model)]) == {}
    assert (model / "preprocessor_config.json").is_file()
    (tmp_path / "serve").mkdir()
    server = start_server(tmp_path / "serve", model)
    try:
        monkeypatch.setenv("TINKER_BASE_URL", server.url)
        monkeypatch.setenv("TINKER_API_KEY", API_KEY)
        report = image_captions.main(["--model", str(model)])
    finally:
        stop_server(server.process)
    assert report["last_loss"] < report["first_loss"] / 4, report
    assert report["right"] >= 2, report  # pictures it never saw, by their tint (3 of 3 on the machines we ran)
    out = capsys.readouterr().out
    assert "step  40/40  loss per caption token" in out and "captioned right" in out

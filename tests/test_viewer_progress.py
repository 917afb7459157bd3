"""The explorer's worker shows a first-use ONNX export in napari's activity bar (not only a status)."""

from __future__ import annotations

import pytest

from data_helpers import write_mammogram


class _Recorder:
    """Stands in for napari.utils.progress and records what the worker showed."""

    made: list = []

    def __init__(self, total: int = 0, desc: str = "") -> None:
        self.total, self.texts, self.closed = total, [desc], False
        _Recorder.made.append(self)

    def set_description(self, text: str) -> None:
        self.texts.append(text)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.mark.slow
def test_first_use_export_shows_in_napari_progress_and_a_cached_run_shows_none(
    tmp_path, monkeypatch
):
    import napari.utils

    from napari_mammo_sae._napari import model_choice as mc
    from napari_mammo_sae.dicom import read_mammogram

    monkeypatch.setenv("NAPARI_MAMMO_SAE_CACHE_DIR", str(tmp_path / "onnx"))
    monkeypatch.setenv("NAPARI_MAMMO_SAE_RUNTIME", "onnx")
    monkeypatch.setattr(napari.utils, "progress", _Recorder)
    monkeypatch.setattr(mc, "_CACHE", {})
    _Recorder.made.clear()
    record = read_mammogram(write_mammogram(tmp_path / "L_CC.dcm"))
    choice = mc.bundled_choice("calcification", "finetuned", device="cpu")

    def run() -> tuple:
        gen = mc.analyse_layers(
            [("L CC", record, None)], choice, ranking="logit", target_class=1, k=3, shapes=[]
        )
        texts = []
        try:
            while True:
                texts.append(next(gen))
        except StopIteration as stop:
            return texts, stop.value

    texts, (models, results, _used) = run()
    assert models is not None and set(results) == {"L CC"}
    assert models.analyzer.runtime_name == "onnx"
    assert "preparing the backbone runtime" in texts
    assert len(_Recorder.made) == 1, "the export made no progress bar in napari"
    bar = _Recorder.made[0]
    assert bar.closed
    assert any("export" in t.lower() for t in bar.texts), bar.texts

    # a second run with new models (same weights) loads the cached graph: no bar at all
    monkeypatch.setattr(mc, "_CACHE", {})
    _Recorder.made.clear()
    texts, (models, results, _used) = run()
    assert set(results) == {"L CC"} and models.analyzer.runtime_name == "onnx"
    assert _Recorder.made == []

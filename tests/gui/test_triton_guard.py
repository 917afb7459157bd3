"""torch's lazy triton import must not crash a napari process whose canvas loaded Mesa's LLVM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gui


def test_timm_model_after_canvas_does_not_crash():
    """A fresh process: napari canvas first, then the plugin builds a model.

    What the guard must do follows from two facts the child process records itself before the
    plugin is imported: whether triton is installed and whether a libLLVM is mapped (Mesa's
    llvmpipe under Xvfb). Installed + LLVM loaded: triton is hidden from torch (``import triton``
    raises ImportError); installed, no LLVM: triton is imported first; not installed: nothing.
    """
    code = textwrap.dedent(
        """
        import importlib.util, json, sys
        import numpy as np
        import napari
        viewer = napari.Viewer(show=True)
        viewer.add_image(np.zeros((8, 8)))
        viewer.screenshot()
        with open("/proc/self/maps") as fh:
            llvm = "libLLVM" in fh.read()
        present = importlib.util.find_spec("triton") is not None
        before = "triton" in sys.modules
        import napari_mammo_sae._napari  # runs guard_triton() on import
        mod = sys.modules.get("triton", "missing")
        after = "missing" if mod == "missing" else ("hidden" if mod is None else "module")
        try:
            import triton  # noqa: F401
            importable = True
        except ImportError:
            importable = False
        import timm, torch
        model = timm.create_model("test_efficientnet", pretrained=False)
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, 64, 64))
        viewer.close()
        print("FACTS " + json.dumps({"llvm": llvm, "present": present, "before": before,
              "after": after, "importable": importable, "shape": list(out.shape)}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a segfault is -11
    facts = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("FACTS "))[6:])
    assert not facts["before"], "napari imported triton before the plugin could guard it"
    if not facts["present"]:
        assert facts["after"] == "missing" and not facts["importable"]
    elif facts["llvm"]:
        assert facts["after"] == "hidden" and not facts["importable"]
    else:
        assert facts["after"] == "module" and facts["importable"]
    assert facts["shape"][0] == 1 and len(facts["shape"]) == 4


@pytest.fixture
def fresh_guard(monkeypatch, tmp_path):
    """guard_triton with no triton imported yet and a fake triton package on the path."""
    from napari_mammo_sae import _napari

    # set then delete: undoing both restores this process's own triton entry (or its absence)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "triton")
    pkg = tmp_path / "triton"
    pkg.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    return _napari, pkg


@pytest.mark.parametrize(
    ("installed", "llvm", "broken", "state", "left"),
    [
        (False, True, False, "absent", "missing"),
        (True, True, False, "blocked", "hidden"),  # the crash case: triton must not load
        (True, False, False, "imported", "module"),  # loaded before any canvas: both work
        (True, False, True, "blocked", "hidden"),  # a broken triton install does not stop us
    ],
)
def test_guard_decides_from_triton_and_llvm(fresh_guard, monkeypatch, installed, llvm, broken,
                                            state, left):  # fmt: skip
    guard, pkg = fresh_guard
    if installed:
        (pkg / "__init__.py").write_text(
            "raise RuntimeError('broken')\n" if broken else "FAKE = 1\n"
        )
    monkeypatch.setattr(guard, "_llvm_already_loaded", lambda: llvm)
    if not installed:
        monkeypatch.setattr(guard.importlib.util, "find_spec", lambda name: None)
    assert guard.guard_triton() == state
    mod = sys.modules.get("triton", "missing")
    assert ("missing" if mod == "missing" else "hidden" if mod is None else "module") == left
    if left == "module":
        assert sys.modules["triton"].FAKE == 1
    # a second call reports what the first did and changes nothing
    if left != "missing":
        assert guard.guard_triton() == ("blocked" if left == "hidden" else "already-imported")

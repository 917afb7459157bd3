"""torch's lazy triton import must not crash a napari process whose canvas loaded Mesa's LLVM."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gui


def test_timm_model_after_canvas_does_not_crash():
    """A fresh process: napari canvas first (libLLVM under Xvfb), then the plugin builds a model."""
    code = textwrap.dedent(
        """
        import numpy as np
        import napari
        viewer = napari.Viewer(show=True)
        viewer.add_image(np.zeros((8, 8)))
        viewer.screenshot()
        from napari_mammo_sae._napari import guard_triton
        state = guard_triton()
        import timm, torch
        model = timm.create_model("test_efficientnet", pretrained=False)
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 3, 64, 64))
        viewer.close()
        print("STATE", state, tuple(out.shape))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("STATE")][0]
    assert line.split()[1] in {"blocked", "imported", "absent", "already-imported"}
    assert "(1," in line

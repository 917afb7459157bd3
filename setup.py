"""Build hook: a built wheel carries the bundled demo weights.

Everything else lives in pyproject.toml. The top-level ``weights/`` folder stays the single source;
building a wheel copies it to ``napari_mammo_sae/_bundled_weights/`` inside the package, where
``models.weights.bundled_weights_dir`` finds it in an installed copy. Editable installs read
``weights/`` in place and copy nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

WEIGHTS = Path(__file__).resolve().parent / "weights"
PACKAGED = Path("napari_mammo_sae") / "_bundled_weights"


class BuildPyWithWeights(build_py):
    """build_py that also copies ``weights/`` into the package (not in editable mode)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (WEIGHTS / "MANIFEST.json").is_file():
            raise SystemExit(
                "weights/MANIFEST.json is missing: the wheel would ship without the demo weights "
                "(run `make weights`, or build from a checkout that has them)"
            )
        target = Path(self.build_lib) / PACKAGED
        if target.exists():
            shutil.rmtree(target)
        # exactly the files the manifest lists (with their hashes), and the manifest itself
        files = json.loads((WEIGHTS / "MANIFEST.json").read_text())["files"]
        for rel in ["MANIFEST.json", *sorted(files)]:
            src, dst = WEIGHTS / rel, target / rel
            if not src.is_file():
                raise SystemExit(f"weights/{rel} is listed in weights/MANIFEST.json but missing")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


setup(cmdclass={"build_py": BuildPyWithWeights})

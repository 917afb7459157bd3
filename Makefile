# napari-mammo-sae: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SYSTEM_PACKAGES := xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 \
	libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 \
	libxcb-xinerama0 libxcb-xinput0 libdbus-1-3 libfontconfig1 \
	postgresql \
	orthanc orthanc-dicomweb dicom3tools dcmtk
export OMP_NUM_THREADS ?= 2

.PHONY: demo test system-deps venv lint format screenshots benchmarks weights evaluation clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Xvfb and the OpenGL/xcb libraries napari needs for headless rendering (Debian/Ubuntu).
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "Missing system packages:$$missing -- install them (apt-get install$$missing) and re-run."; exit 1; fi; \
	  echo "Installing system packages:$$missing"; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

test: system-deps venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: venv
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

# Opens napari on a sample with the analysis run; with no display, writes images and says where.
demo: venv
	@if [ -z "$$DISPLAY$$WAYLAND_DISPLAY" ]; then $(MAKE) -s system-deps || echo "(no Xvfb: the demo needs a display)"; fi
	$(PY) scripts/demo.py

screenshots: system-deps venv
	xvfb-run -a -s "-screen 0 1920x1200x24" $(PY) scripts/screenshot_hanging.py
	xvfb-run -a -s "-screen 0 1920x1200x24" $(PY) scripts/screenshots.py
	xvfb-run -a -s "-screen 0 1920x1200x24" $(PY) scripts/screenshot_study.py
	xvfb-run -a -s "-screen 0 1920x1200x24" $(PY) scripts/screenshot_pacs.py
	$(PY) scripts/phantom_cues_figure.py
	MAMMO_SAE_SCREENSHOTS=docs/images xvfb-run -a -s "-screen 0 1920x1200x24" \
		$(PY) -m pytest -q -p no:cacheprovider tests/gui/test_clinician_loop.py

# Every benchmark as BENCHMARKS.md records it (the GUI one under xvfb-run; the SAE one against the
# paper's library where its side environment exists); `$(PY) benchmarks/run_all.py --dry-run` lists them.
benchmarks: system-deps venv
	$(PY) benchmarks/run_all.py

# Trains the bundled demo weights from scratch (about an hour on 2 CPU cores: 56 min measured) and regenerates
# docs/evaluation/ and docs/EVALUATION.md from them.
weights: venv
	$(PY) scripts/make_weights.py --workers 1
	$(PY) scripts/summarise_evaluation.py --append docs/evaluation_discussion.md

# Re-runs evaluate on the committed weights (phantom data, three feature stores, no training) and
# regenerates docs/evaluation/ and docs/EVALUATION.md.
evaluation: venv
	PY=$(PY) scripts/evaluate_committed.sh build/reeval docs/evaluation
	$(PY) scripts/summarise_evaluation.py --append docs/evaluation_discussion.md

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache

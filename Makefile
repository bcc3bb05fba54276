# Two set-up commands: `make demo` and `make test` (both create .venv when it is missing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BDM    := $(VENV)/bin/bdm
OUT    ?= demo_out
# The demo's run goes where `bdm sample` looks without --run (the newest runs/*/).
DEMO_RUN ?= runs/demo

.PHONY: demo test bench study install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	mkdir -p $(OUT)
	$(PY) -c "from sklearn.datasets import load_digits; from PIL import Image; import numpy as np; \
	  Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8)).save('$(OUT)/digit.png')"
	$(BDM) blur-preview $(OUT)/digit.png --preset digits --out $(OUT)/blur_preview.png
	$(BDM) schedule-plot --preset digits --compare 0,2,4 --out $(OUT)/schedule.png --csv $(OUT)/schedule.csv
	rm -rf $(DEMO_RUN)
	$(BDM) train --preset digits --device cpu --out $(DEMO_RUN)
	cp $(DEMO_RUN)/samples/final.png $(OUT)/samples.png
	@echo "Sample grid: $(OUT)/samples.png (the run: $(DEMO_RUN))"
	@echo "More samples of it: . $(VENV)/bin/activate && bdm sample --n 64 --out grid.png"

test: install
	$(PY) -m pytest -q

# Benchmarks (issue #5): writes docs/benchmarks.md; QUICK=1 for a ~10-minute subset;
# BENCH_ARGS passes options to bench/run.py (e.g. --train-steps 120 --n 50 for smaller items 5 and 6).
# The peers (denoising-diffusion-pytorch, diffusers) go into their own venv, never into the project's:
# it sees the project's packages (torch included) through a .pth file and adds only the peers.
BENCH_VENV := .bench-venv

$(BENCH_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(BENCH_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > $$($(BENCH_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/bdm_project.pth
	$(BENCH_VENV)/bin/python -m pip install -q diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/run.py $(if $(QUICK),--quick --skip-quality,) $(BENCH_ARGS)
	$(if $(QUICK),,$(BENCH_VENV)/bin/python bench/study.py $(STUDY_ARGS))

# Items 8 and 9 alone (issues #10, #11): the converged digits study, <= 2 hours on 2 cores; resumes from runs/study.
study: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/study.py $(STUDY_ARGS)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

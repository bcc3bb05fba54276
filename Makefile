# Two set-up commands: `make demo` and `make test` (both create .venv when it is missing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BDM    := $(VENV)/bin/bdm
OUT    ?= demo_out
# The demo's run goes where `bdm sample` looks without --run (the newest runs/*/).
DEMO_RUN ?= runs/demo
# The benchmarks' peers (and tests/test_bench_gpu.py's smoke run of them) live in their own venv, never in .venv.
BENCH_VENV := .bench-venv

.PHONY: demo test bench study gpu-check gpu-carry install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	mkdir -p $(OUT)
	$(PY) -c "from bdm_cli.data import load_digits; from bdm_cli.io import to_uint8; from PIL import Image; \
	  Image.fromarray(to_uint8(load_digits(16, 1))[0, 0].numpy(), 'L').save('$(OUT)/digit.png')"
	$(BDM) blur-preview $(OUT)/digit.png --preset digits --out $(OUT)/blur_preview.png
	$(BDM) schedule-plot --preset digits --compare 0,2,4 --out $(OUT)/schedule.png --csv $(OUT)/schedule.csv
	rm -rf $(DEMO_RUN)
	$(BDM) train --preset digits --device cpu --out $(DEMO_RUN)
	cp $(DEMO_RUN)/samples/final.png $(OUT)/samples.png
	@echo "Sample grid: $(OUT)/samples.png (the run: $(DEMO_RUN))"
	@echo "More samples of it: . $(VENV)/bin/activate && bdm sample --n 64 --out grid.png"

# The bench venv too: tests/test_bench_gpu.py runs bench/gpu.py --smoke with the peers it times.
test: install $(BENCH_VENV)/.installed
	$(PY) -m pytest -q

# Benchmarks (issue #5): writes docs/benchmarks.md; QUICK=1 for a ~10-minute subset;
# BENCH_ARGS passes options to bench/run.py (e.g. --train-steps 120 --n 50 for smaller items 5 and 6).
# The peers (denoising-diffusion-pytorch, diffusers) go into their own venv, never into the project's:
# it sees the project's packages (torch included) through a .pth file and adds only the peers.
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

# Issue #12's device check: `make gpu-check` runs it here on the CPU (--smoke, a minute); `make gpu-carry` makes what a
# lent GPU machine needs beside the tree (.whl: the peers' and pytorch-fid's wheels; .gpu-data: CIFAR-10 train, 52 MB).
# bench/gpu.py's docstring has the command to run there.
gpu-check: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/gpu.py --smoke

gpu-carry: install
	grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
	grep -qx '/.gpu-data/' .git/info/exclude || echo '/.gpu-data/' >> .git/info/exclude
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3 pytorch-fid==0.3.0 importlib_metadata==10.2.0
	mkdir -p .gpu-data
	$(PY) -c "import zipfile; s = zipfile.ZipFile('../shared/data/cifar10-jpeg.zip'); \
	  d = zipfile.ZipFile('.gpu-data/cifar10-train.zip', 'w'); \
	  [d.writestr(n, s.read(n)) for n in s.namelist() if n.startswith('train/') and n.endswith('.jpg')]; d.close()"

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache

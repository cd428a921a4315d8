# Quickstart: `make demo` and `make test`. Both create or reuse .venv and install what they need.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast cuda-check bench gpu-dry-run paper-tiny clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch is pinned here: a looser requirement would pull a multi-GB CUDA build on a CPU machine.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*.h csrc/*/*.h csrc/*/*.cu)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0 numpy
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mmfuse_fast.demo

# The CUDA sources must keep compiling even where torch is a CPU build: csrc/cuda/*.cu include no torch headers,
# so nvcc compiles them alone, for the archs setup.py builds (8.0 and 9.0) and with the half-type macros torch's
# extension builds define (no implicit __half/__nv_bfloat16 conversions); a register spill fails the check.
NVCC_CHECK_FLAGS := -std=c++17 -Icsrc -Xcompiler -Wall -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
	-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
	-Xptxas --warn-on-spills,--warning-as-error
cuda-check:
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/cuda/*.cu >/dev/null 2>&1; then \
		out=$$(mktemp -d); \
		for f in csrc/cuda/*.cu; do echo "nvcc -c $$f"; \
			nvcc -c $(NVCC_CHECK_FLAGS) -o $$out/$$(basename $$f).o $$f || { rm -rf $$out; exit 1; }; done; \
		rm -rf $$out; \
	else echo "cuda-check: no nvcc or no CUDA sources, skipped"; fi

# The suite includes tests/test_gpu_session.py: the GPU session script's dry run (gpu-dry-run below), so that the
# script a lent GPU runs cannot rot in between.
test: $(STAMP) cuda-check
	$(PY) -m pytest -q -ra tests

# Both calls of benchmarks/gpu_session.sh on the CPU at tiny sizes; output in runs/gpu-dry-run/.
gpu-dry-run: $(STAMP)
	rm -rf runs/gpu-dry-run
	OUT=runs/gpu-dry-run PYTHON=$(PY) bash benchmarks/gpu_session.sh --dry-run

# The paper's Tables 2 (four methods, three modality sets, two label fractions), 6, 7 and 8 at the CPU scale, on
# the BigEarthNet v2 sample (fetched as `make demo` does); resumable: run it again to continue. Report:
# runs/paper-tiny/report.md.
paper-tiny: $(STAMP)
	$(PY) -m mmfuse_fast.cli experiment run --spec paper --scale tiny --out runs/paper-tiny \
		--only table2 table6 table7 table8

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info mmfuse_fast/*.so runs

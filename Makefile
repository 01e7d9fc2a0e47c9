# The two set-up commands of the README:
#   make demo   train a small model with fastckpt.ModelCheckpoint and reload it with Keras
#   make test   install what a fresh machine lacks, then run every test
# Both work on a fresh machine; everything lands in .venv.

PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The benchmark's environment: everything in .venv, plus orbax-checkpoint (and the JAX it
# needs) for Keras's OrbaxCheckpoint, kept out of the test environment.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
# torch's environment: .venv plus torch (the registry's wheel and its CUDA libraries),
# kept out of .venv so that TensorFlow's environment never changes under it.
TORCH_VENV  := .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed
TORCH_PIN   := torch==2.15.*
export KERAS_BACKEND ?= tensorflow
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYO3_PYTHON := $(abspath $(VPY))

# The older Keras minors fastckpt supports (3.12.0 too: its first patches differ), each tested
# by the format and callback tests:
# Keras is pure Python, so each is installed on its own (no dependencies) into a folder
# that shadows the venv's Keras on PYTHONPATH.
KERAS_MINORS := 3.12.0 3.12 3.13 3.14
KERAS_MINOR_TESTS := tests/test_formats.py tests/test_callback_parity.py \
    tests/test_callback_background.py tests/test_keras_versions.py

# The tests that make sense under every backend (saving, loading, the callback), run under
# JAX and torch after the whole suite has run under TensorFlow.
BACKEND_TESTS := tests/test_backends.py tests/test_api.py tests/test_formats.py \
    tests/test_callback_parity.py tests/test_callback_background.py tests/test_snapshot_hold.py \
    tests/test_device_copy.py tests/test_whole_fit.py tests/test_process_shards.py \
    tests/test_snapshot_into_file.py tests/test_cuda_driver.py

.PHONY: demo test test-rust test-python test-keras-minors test-backends typecheck dev \
    system-deps bench bench-quick device-bundle clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "maturin>=1.7,<2" "tensorflow-cpu==2.21.*" "keras>=3.15,<3.16" \
	    "jax[cpu]==0.10.2" h5py ml-dtypes numpy safetensors zstandard pytest hypothesis \
	    psutil mypy ruff pytest-benchmark matplotlib
	touch $(STAMP)

# h5dump/h5diff (oracles), strace (durability order), R + reticulate (the R keras test).
system-deps:
	@command -v h5dump >/dev/null && command -v strace >/dev/null && command -v Rscript >/dev/null \
	    && Rscript -e 'library(reticulate)' >/dev/null 2>&1 || { \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	        hdf5-tools strace r-base-core r-cran-reticulate; }

# The extension, built in place (python/fastckpt/_fastckpt.abi3.so, with the test-only fault
# injection switch), and python/ put on the venv's path. `pip install .` builds the wheel.
dev: $(STAMP)
	PYO3_BUILD_EXTENSION_MODULE=1 cargo build -q -p fastckpt-python --profile dev-fast \
	    --features fault-injection
	cp target/dev-fast/lib_fastckpt.so python/fastckpt/_fastckpt.abi3.so
	echo "$(abspath python)" > "$$($(VPY) -c 'import site; print(site.getsitepackages()[0])')/fastckpt-dev.pth"

test-rust:
	cargo fmt --all -- --check
	cargo clippy -q --workspace --all-targets -- -D warnings
	cargo test -q --workspace --exclude fastckpt-python

test-python: dev system-deps typecheck
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples
	$(VPY) -m pytest -q

# mypy, strict on the package; stubtest checks the native module's stub against the module.
typecheck: dev
	$(VPY) -m mypy
	$(VPY) -m mypy.stubtest fastckpt._fastckpt --allowlist python/stubtest-allowlist.txt

test-keras-minors: dev
	@for v in $(KERAS_MINORS); do \
	    $(VPY) -m pip install -q --no-deps --upgrade --target .keras-$$v "keras==$$v.*" || exit 1; \
	    echo "== Keras $$v"; \
	    PYTHONPATH=.keras-$$v $(VPY) -m pytest -q -p no:cacheprovider $(KERAS_MINOR_TESTS) || exit 1; \
	done

$(TORCH_STAMP): $(STAMP)
	$(PY) -m venv $(TORCH_VENV)
	echo "import site; site.addsitedir('$$($(VPY) -c 'import site; print(site.getsitepackages()[0])')')" \
	    > "$$($(TORCH_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/fastckpt-venv.pth"
	$(TORCH_VENV)/bin/python -m pip install -q "$(TORCH_PIN)"
	touch $(TORCH_STAMP)

# The backend tests under JAX (in .venv) and torch (in .venv-torch, which sees .venv's
# packages, so that files also cross between all three backends there).
test-backends: dev system-deps $(TORCH_STAMP)
	KERAS_BACKEND=jax $(VPY) -m pytest -q -p no:cacheprovider $(BACKEND_TESTS) tests/test_backup.py
	KERAS_BACKEND=torch FASTCKPT_TEST_BACKENDS=tensorflow,jax,torch $(TORCH_VENV)/bin/python \
	    -m pytest -q -p no:cacheprovider $(BACKEND_TESTS) tests/test_backup.py \
	    tests/test_resume.py tests/test_cross_backend.py

test: $(STAMP) system-deps test-rust test-python test-keras-minors test-backends

demo: dev
	$(VPY) examples/demo.py

$(BENCH_STAMP): $(STAMP)
	$(PY) -m venv $(BENCH_VENV)
	echo "import site; site.addsitedir('$$($(VPY) -c 'import site; print(site.getsitepackages()[0])')')" \
	    > "$$($(BENCH_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/fastckpt-venv.pth"
	$(BENCH_VENV)/bin/python -m pip install -q "orbax-checkpoint>=0.12,<0.13"
	touch $(BENCH_STAMP)

bench: dev $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m fastckpt.cli bench

bench-quick: dev $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m fastckpt.cli bench --quick

# What a lent GPU machine lacks for benches/gpu_on_device.sh (its image has torch, JAX and
# h5py, not Keras): a release build of the extension and Keras's wheels for its Python 3.12.
DEVICE_WHEELS := keras==3.15.1 namex==0.1.0 optree==0.20.0

device-bundle: $(STAMP)
	PYO3_BUILD_EXTENSION_MODULE=1 cargo build -q -p fastckpt-python --release
	rm -rf .device && mkdir -p .device/wheels
	cp target/release/lib_fastckpt.so .device/_fastckpt.abi3.so
	$(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .device/wheels $(DEVICE_WHEELS)

clean:
	rm -rf target $(VENV) $(BENCH_VENV) $(TORCH_VENV) .device .keras-3.* python/fastckpt/*.so

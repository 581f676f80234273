# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every dependency at one version (resolved from pyproject.toml's ranges by `make lock`): the
# laptop, CI and the cluster image (infra/Dockerfile) install this same file.
LOCK := requirements.lock

.PHONY: install lock demo test test-fast clean

# Bytecode is compiled on every core after the install (pip compiles on one: 41 s against 27 s
# here); like pip's own pass it skips the few files that are not Python 3 (compileall exits 1).
# The project's own package too: it is installed editable, and where PYTHONDONTWRITEBYTECODE
# is set every job, Ray worker and replica would otherwise compile it again on import.
# The last step builds DeepSpeed's CPU shared-memory all-reduce op, which it otherwise compiles
# on first use (~30 s of g++ inside the first training run): once per machine (nothing to
# build on GPU accelerators), with the venv's ninja, as every training worker builds it.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r $(LOCK)
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null \
		|| true
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m compileall -q -j 0 sscq_dist >/dev/null
	$(PY) -c "from sscq_dist.train.loop import use_interpreter_ninja; use_interpreter_ninja(); \
		import deepspeed; from deepspeed.accelerator import get_accelerator; \
		b = get_accelerator().create_op_builder('ShareMemCommBuilder'); \
		b and deepspeed.ops.__compatible_ops__.get(b.NAME) and b.load()" >/dev/null 2>&1 \
		|| echo "note: DeepSpeed's CPU comm op was not prebuilt; the first training run builds it"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --config configs/digits.yaml

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=30

# Unit and contract tests only: no Ray Train run, no end-to-end job (see tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider -m "not slow" --durations=15

# The upgrade path: re-resolve every pin within pyproject.toml's ranges (and constraints.txt's
# caps) for the image's Python on Linux, then `make test`.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --constraint constraints.txt --upgrade \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o $(LOCK)

clean:
	rm -rf data runs mlruns.db index outputs .cache

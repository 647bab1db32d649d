# featurekit: `make demo` and `make test` work on a fresh machine (they install what they need).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch pair this project is tested with; on a GPU machine any CUDA build >= 2.4 works too.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

DATA ?= data/digits
SPLITS ?= train valid
BACKBONES ?= efficientnet_lite0 efficientnet_lite2
WEIGHTS ?= DEFAULT
FEATURES ?= features
EXTRACT_FLAGS ?=
HEAD ?= all
HEAD_FLAGS ?=
# finetune: the head train-head wrote for HEAD and BACKBONES (HEAD=all writes heads/all-...), fine-tuned on DATA
empty :=
space := $(empty) $(empty)
HEAD_FILE ?= $(FEATURES)/heads/$(HEAD)-$(subst $(space),+,$(strip $(BACKBONES)))/head.h5
UNFREEZE ?= none
FINETUNE_FLAGS ?=

.PHONY: install data extract train-head finetune demo test bench bench-finetune bench-precision bench-augment clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

data: install
	$(PY) -m featurekit.demo --out data/digits

extract: install
	$(PY) -m featurekit extract $(DATA) --split $(SPLITS) --backbone $(BACKBONES) --weights $(WEIGHTS) --out $(FEATURES) $(EXTRACT_FLAGS)

train-head: install
	$(PY) -m featurekit train-head $(FEATURES) --backbone $(BACKBONES) --head $(HEAD) $(HEAD_FLAGS)

finetune: install
	$(PY) -m featurekit finetune --head $(HEAD_FILE) $(DATA) --unfreeze $(UNFREEZE) $(FINETUNE_FLAGS)

demo: data
	$(MAKE) --no-print-directory extract DATA=data/digits FEATURES=features/digits BACKBONES="$(BACKBONES)"
	$(PY) -m featurekit info features/digits/train/*.h5
	$(MAKE) --no-print-directory train-head FEATURES=features/digits BACKBONES="$(BACKBONES)" HEAD=mlp

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf features/digits data/digits

bench: install
	$(PY) benchmarks/bench_extract.py
	$(PY) benchmarks/bench_head.py

# finetune's training step vs a bare torch loop (goal: within 1.2x), e.g. BENCH_FLAGS="--device cuda --batch-size 64"
BENCH_FLAGS ?=
bench-finetune: install
	$(PY) benchmarks/bench_finetune.py $(BENCH_FLAGS)

# Head accuracy on bf16 vs fp32 features (issue 5 goal: within 0.5 points), e.g. DATA=path/to/hymenoptera
bench-precision: install
	$(PY) benchmarks/bench_precision.py $(DATA)

# Augmented caches and test-time views on a real set (docs/augment.md), e.g. DATA=path/to/hymenoptera
AUGMENT_WORK ?= /tmp/bench_augment/$(notdir $(DATA))
bench-augment: install
	$(PY) benchmarks/bench_augment.py --data $(DATA) --work $(AUGMENT_WORK) $(BENCH_FLAGS)

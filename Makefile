# `make demo` and `make test` both start from nothing but Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODELS ?= custom_cnn lenet5 resnet18 mobilenetv2
DEMO_ARGS ?= --data digits --weights none --image-size 32 --epochs 8 --batch-size 32 --num-workers 0
DEMO_SUMMARY := .cnnflow/demo-runs.txt

.PHONY: setup demo test lint clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/cnnflow up
	@rm -f $(DEMO_SUMMARY)
	@for model in $(DEMO_MODELS); do \
	  echo "== training $$model"; \
	  line=$$(MLFLOW_DISABLE_TELEMETRY=true $(BIN)/cnnflow train --model $$model $(DEMO_ARGS)) || exit 1; \
	  echo "$$line" | tee -a $(DEMO_SUMMARY); \
	done
	@echo; echo "Runs (name, run id, best validation accuracy, MLflow link):"; cat $(DEMO_SUMMARY)
	@echo; $(BIN)/cnnflow status mlflow
	@echo "Browse and compare the runs in the MLflow UI above; stop the servers with: $(BIN)/cnnflow down"

lint: $(STAMP)
	$(BIN)/ruff check .

# The dashboard's browser test needs /usr/bin/chromium: install it when we can (root + apt),
# never fail because we cannot (the test then skips and says why).
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get install -y chromium >/dev/null 2>&1; } \
	  || echo "chromium not installed: the dashboard browser test will skip"

test: $(STAMP) chromium
	$(BIN)/ruff check .
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/pytest -q

clean:
	-$(BIN)/cnnflow down
	rm -rf $(VENV) .cnnflow

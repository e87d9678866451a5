# `make demo` and `make test` both start from nothing but Python 3.11 and the package registries.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODELS ?= custom_cnn,lenet5,resnet18,mobilenetv2
DEMO_ARGS ?= --data digits --weights none --image-size 32 --epochs 8 --batch-size 32 --num-workers 0
DEMO_SUMMARY := .cnnflow/demo-summary.txt
RUN_ENV := MLFLOW_DISABLE_TELEMETRY=true

.PHONY: setup demo test lint clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The main job: servers + mirror follower, then the whole pipeline on the bundled digits.
# Run it again and every step is reused; `cnnflow run --force true` re-runs them.
demo: $(STAMP)
	$(RUN_ENV) $(BIN)/cnnflow up --with-sync true
	$(RUN_ENV) $(BIN)/cnnflow run --models $(DEMO_MODELS) $(DEMO_ARGS) > $(DEMO_SUMMARY)
	@cat $(DEMO_SUMMARY)
	@echo
	@echo "MLflow UI:  $$(grep -Eo 'https?://[^ ]+' $(DEMO_SUMMARY) | head -1)"
	@echo "Dashboard:  $(BIN)/cnnflow dashboard   (then open http://127.0.0.1:8501)"
	@echo "Champion:   $$(sed -n 's/^champion: //p' $(DEMO_SUMMARY))"
	@echo "Report:     reports/digits/report.html"
	@echo "Stop the servers with: $(BIN)/cnnflow down"

lint: $(STAMP)
	$(BIN)/ruff check .

# The browser tests need /usr/bin/chromium, the report's PDF test pdftotext (poppler-utils),
# the PostgreSQL tests initdb/postgres (postgresql): install them when we can (root + apt),
# never fail because we cannot (the tests then skip and say why).
chromium:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get install -y chromium >/dev/null 2>&1; } \
	  || echo "chromium not installed: the dashboard browser test will skip"
	@command -v pdftotext >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get install -y poppler-utils >/dev/null 2>&1; } \
	  || echo "poppler-utils not installed: the report PDF test will skip"
	@{ command -v postgres >/dev/null || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; } \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get install -y postgresql >/dev/null 2>&1; } \
	  || echo "postgresql not installed: the PostgreSQL tests will skip"

test: $(STAMP) chromium
	$(BIN)/ruff check .
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/pytest -q

clean:
	-$(BIN)/cnnflow down
	rm -rf $(VENV) .cnnflow

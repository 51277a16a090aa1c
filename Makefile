# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Their set-up skips the installs while nothing they install has changed (see
# scripts/setup.sh); SETUP_FORCE=1 installs again.
PYTHON ?= python3

.PHONY: setup setup-test setup-bench demo test bench-recall-ocr

setup:
	scripts/setup.sh deepseek-ocr,redis

setup-test:
	scripts/setup.sh deepseek-ocr,test,redis

setup-bench:
	scripts/setup.sh deepseek-ocr,redis,bench

demo: setup
	optical-memory demo --out out/demo

test: setup-test
	$(PYTHON) -m pytest -q

# Tesseract reads evidence turns back at every tier (benchmarks/results/ocr_check.json)
bench-recall-ocr: setup-bench
	$(PYTHON) benchmarks/ocr_check.py

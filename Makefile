# The two set-up commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3

.PHONY: setup setup-test demo test

setup:
	scripts/setup.sh deepseek-ocr,redis

setup-test:
	scripts/setup.sh deepseek-ocr,test,redis

demo: setup
	optical-memory demo --out out/demo

test: setup-test
	$(PYTHON) -m pytest -q

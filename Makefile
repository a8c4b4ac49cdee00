# The two commands of the README. Both set everything up first (scripts/setup.sh is idempotent).
CONFIG ?= configs/movielens_age.yaml

.PHONY: run test lint setup
setup:
	./scripts/setup.sh

run: setup
	.venv/bin/iak-dist pipeline run $(CONFIG)

test: setup
	./scripts/setup_test_services.sh
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -ra

lint: setup
	.venv/bin/ruff check .

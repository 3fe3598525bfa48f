# One image for every service: each Deployment of the Helm chart runs
# `python -m services.<name>.main` in it (see helm/cex and docs/operations.md).
#   docker build -t ghcr.io/cex-core/cex:0.1.0 .
# The chart runs it as uid 10001 with a read-only root filesystem (/tmp and
# /var/lib/cex are volumes), so nothing here writes at run time.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY cex_stack ./cex_stack
COPY chainsim ./chainsim
COPY gen/python ./gen/python
RUN python -m venv /opt/cex \
    && /opt/cex/bin/pip install --no-cache-dir . \
    && /opt/cex/bin/python -m compileall -q /opt/cex

FROM python:3.11-slim-bookworm
ENV PATH=/opt/cex/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 cex \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cex
COPY --from=build /opt/cex /opt/cex
WORKDIR /var/lib/cex
USER 10001:10001

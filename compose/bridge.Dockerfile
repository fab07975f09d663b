# RackTwin bridge image: the bridge (`racktwin run`), the simulator (`racktwin simulate`) and the
# one-shot tools (`racktwin init-secrets`, `racktwin bootstrap`, `python -m dashboards.generate` for Grafana's
# provisioning with the thresholds from compose/.env). Build context: the repository root.
FROM python:3.12.14-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# README.md* : the package metadata points at README.md; the glob keeps the build working without it.
COPY pyproject.toml README.md* ./
COPY bridge ./bridge
COPY dashboards ./dashboards
RUN pip install ".[thingsboard,dashboards]" \
    && rm -rf /src

# Non-root user; group 0 so Grafana (uid 472, gid 0) can read the token file bootstrap writes for it.
RUN useradd --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin racktwin \
    && install -d -o 10001 -g 0 -m 0755 /run/racktwin /provisioning
USER 10001:0
WORKDIR /app

EXPOSE 9108
# Slim images have neither curl nor wget.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=3).status != 200)"]

ENTRYPOINT ["racktwin"]
CMD ["run"]

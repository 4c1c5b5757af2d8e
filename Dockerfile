# One image for every process of the example fleet; the command picks the role:
#   kafka-dramatiq-bridge run tasks    the bridge (metrics and health on BRIDGE_HTTP_PORT, 9400)
#   dramatiq tasks                     workers (Prometheus exposition on dramatiq_prom_port, 9191)
#   python -m tasks.produce            the sample producer
#   python -m tasks.topics             creates the example topics
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Installed from a scratch directory, so that no source tree shadows the installed package on
# the workers' and the bridge's import path (both put the working directory on it).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install . && rm -rf /src

# A numeric user, so that runtimes that enforce non-root can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app
COPY --chown=root:root tasks ./tasks
ENV PYTHONPATH=/app

USER 10001:10001

EXPOSE 9400 9191

CMD ["kafka-dramatiq-bridge", "run", "tasks"]

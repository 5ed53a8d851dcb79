# One image, every role: `prefetch api` (default), `prefetch worker`, `prefetch sandbox`.
# Build: docker build --network host -t exprsn-prefetch .   (see README, "Deploying")
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY api ./api
COPY sandbox ./sandbox
COPY prefetch ./prefetch
# The package itself with its `tracing` extra (OTEL_TRACES_EXPORTER=otlp works in the image);
# versions are bounded by pyproject.toml, which hadolint cannot see through an extra.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --prefix=/install ".[tracing]"

FROM python:3.11-slim
# PREFETCH_HEALTH_PORT: the supervisor's /live, /ready and /metrics (a worker container has
# nothing else to probe); the API ignores it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ENV=production \
    PREFETCH_HEALTH_PORT=3006
COPY --from=build /install /usr/local
# A numeric, fixed uid/gid so that Kubernetes' runAsNonRoot can check it. The working
# directory is empty and not writable: no stray .env is read, nothing is written there.
RUN groupadd --system --gid 10001 prefetch \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin prefetch
WORKDIR /app
USER 10001:10001
EXPOSE 3005 3006
# `prefetch probe` finds the role this container runs from the process titles and asks that
# role's own health route on the configured port (API /health/ready, supervisor /ready,
# sandbox /health), so one check fits every role and follows a changed port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["prefetch", "probe"]
ENTRYPOINT ["prefetch"]
CMD ["api"]

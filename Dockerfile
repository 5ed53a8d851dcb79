# One image, every role: `prefetch api` (default), `prefetch worker`, `prefetch sandbox`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY api ./api
COPY sandbox ./sandbox
COPY prefetch ./prefetch
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 ENV=production
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 prefetch
USER prefetch
EXPOSE 3005
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3005/health/ready', timeout=2).status == 200 else 1)"
ENTRYPOINT ["prefetch"]
CMD ["api"]

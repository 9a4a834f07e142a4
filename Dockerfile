# Build: the package in a virtualenv, its hot modules compiled with mypyc (`make compile`
# does the same in a checkout); the compiler and mypy stay in this stage.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY worker /src/worker
COPY schemas /src/schemas
RUN python -m venv /venv \
    && /venv/bin/pip install --no-cache-dir /src 'mypy>=1.11' \
    && /venv/bin/python -m worker.devtools.compile \
    && /venv/bin/pip uninstall --yes mypy

FROM python:3.11-slim
COPY --from=build /venv /venv
# An unprivileged user; its SQLite file in /data (a volume there starts owned by it).
RUN useradd --system --uid 10001 --no-create-home jobs && mkdir /data && chown jobs /data
ENV PATH=/venv/bin:$PATH JOBS_DB_PATH=/data/jobs.db
WORKDIR /app
COPY examples ./examples
USER jobs
EXPOSE 8080
STOPSIGNAL SIGTERM
CMD ["jobctl", "run"]

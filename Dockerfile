FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY schemas ./schemas
COPY examples ./examples
RUN pip install --no-cache-dir .
STOPSIGNAL SIGTERM
CMD ["jobctl", "run"]

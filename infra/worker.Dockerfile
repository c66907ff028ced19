# The image of Ray workers, the Prefect worker and the MLflow server.
FROM python:3.11-slim
WORKDIR /opt/erasure
COPY pyproject.toml README.md ./
COPY erasure ./erasure
COPY tasks ./tasks
COPY flows ./flows
COPY prefect.yaml ./
RUN pip install --no-cache-dir -e ".[pipeline]" psycopg2-binary
ENV HF_HUB_OFFLINE=0 OMP_WAIT_POLICY=PASSIVE

# The image of Ray workers, the Prefect worker and the MLflow server.
FROM python:3.11-slim
# The only hub models the worker loads, each pinned to a revision (commit sha):
# a comma-separated list of <hub id>@<revision>. A request for any other model,
# or for a listed one at another revision, is refused. Override at build time:
#   docker build --build-arg ERASURE_ALLOWED_MODELS=org/model@<sha>,... -f infra/worker.Dockerfile .
# The default is Stable Diffusion 1.4 at its `main` revision when this was written;
# check it against https://huggingface.co/CompVis/stable-diffusion-v1-4/commits/main before a release.
ARG ERASURE_ALLOWED_MODELS=CompVis/stable-diffusion-v1-4@133a221b8aa7292a167afc5127cb63fb5005638b
WORKDIR /opt/erasure
COPY pyproject.toml README.md ./
COPY erasure ./erasure
COPY tasks ./tasks
COPY flows ./flows
COPY cli ./cli
COPY prefect.yaml audit-policy.yaml ./
RUN pip install --no-cache-dir -e ".[pipeline]"
# Requests may name local files (caption corpora, model folders) only under this folder:
# never the runner's own files (service-account tokens, credentials).
ENV HF_HUB_OFFLINE=0 OMP_WAIT_POLICY=PASSIVE ERASURE_ALLOWED_MODELS=${ERASURE_ALLOWED_MODELS} \
    ERASURE_INPUT_ROOT=/data/inputs \
    DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

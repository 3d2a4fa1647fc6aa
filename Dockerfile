# rewardserve server image: rm-serve on ONNX Runtime (CUDA, TensorRT or CPU). No torch, no training code.
#   make image                      # podman where docker is absent; see docs/deploy.md
#   docker run --gpus all -v $PWD/runs/demo/bundle:/models/bundle:ro -p 50051:50051 -p 9090:9090 rewardserve
# BASE_IMAGE is a CUDA 13 runtime with cuDNN 9, what onnxruntime-gpu 1.31's CUDA provider loads; on a host without a GPU the
# server falls back to the CPU provider with a logged warning. Any Debian/Ubuntu base with apt works too.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/rewardserve
COPY proto/pyproject.toml /src/proto/pyproject.toml
COPY proto/src/ /src/proto/src/
COPY server/ /src/server/
# The contract and the server only: no client, no training code, nothing that pulls torch.
RUN /opt/rewardserve/bin/pip install --no-cache-dir /src/proto /src/server

FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rewardserve
COPY --from=build /opt/rewardserve /opt/rewardserve
# Configuration is by RM_* environment variables (every rm-serve flag has one; docs/operations.md).
ENV PATH=/opt/rewardserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RM_BUNDLE=/models/bundle \
    RM_HOST=0.0.0.0 \
    RM_PORT=50051 \
    RM_METRICS_HOST=0.0.0.0 \
    RM_METRICS_PORT=9090 \
    RM_PROVIDERS=cuda,cpu \
    RM_LOG_FORMAT=json
USER 10001
# gRPC, Prometheus metrics, and the optional OpenRLHF HTTP endpoint (RM_HTTP_PORT=8000 turns it on).
EXPOSE 50051 9090 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["sh", "-c", "rm-serve-probe --target 127.0.0.1:${RM_PORT} --timeout 3"]
# SIGTERM: health goes NOT_SERVING, new calls are refused, calls in flight finish within RM_GRACE_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rm-serve"]

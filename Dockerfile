# fairgpu: one image for the server and the agent (the command picks which).
#   docker build -t fairgpu .
#   docker run -p 8080:8080 -e FAIRGPU_DATABASE_URL=postgresql://... fairgpu server --host 0.0.0.0
#   docker run --gpus all fairgpu agent --server https://fairgpu.example --join-token ...
# The agent finds NVML through the NVIDIA container runtime (libnvidia-ml is mounted in).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc, a static libc and make: the agent's container entrypoint (make helper), in the wheel.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md Makefile ./
COPY protocol ./protocol
COPY scheduler ./scheduler
COPY api ./api
COPY agents ./agents
COPY cli ./cli
COPY migrations ./migrations
RUN make helper && python -m pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
# pasta (passt), ip (iproute2) and nft (nftables): the agent's private task networks and the
# wall between them and the node (docs/ISOLATION.md). tini: process 1 of the container, which
# reaps what the agent's tasks leave behind (as process 1 the agent would leave them zombies,
# each holding a pid, until no task on the node could start one).
RUN apt-get update && apt-get install -y --no-install-recommends passt iproute2 nftables tini \
    && rm -rf /var/lib/apt/lists/*
RUN python -m pip install /wheels/*.whl && rm -rf /wheels \
    && groupadd --system --gid 10001 fairgpu \
    && useradd --system --uid 10001 --gid fairgpu --home-dir /var/lib/fairgpu \
       --create-home --shell /usr/sbin/nologin fairgpu
USER 10001:10001
WORKDIR /var/lib/fairgpu
# Server API and /metrics; the agent's /metrics when started with --metrics-port 9400.
EXPOSE 8080 9400
ENTRYPOINT ["tini", "--", "fairgpu"]
CMD ["server", "--host", "0.0.0.0", "--port", "8080"]

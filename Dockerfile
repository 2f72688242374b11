# cdc-worker container image.
#
#   docker build -t cdc-worker:0.1.0 .
#   docker run --rm -e CDC_WORKER__QUEUE__URL=... -e CDC_WORKER__SOURCE__BUCKET=... cdc-worker:0.1.0
#
# Configuration: /etc/cdc-worker/config.toml (a copy of config/default.toml; mount your own
# file over it, or point CDC_WORKER_CONFIG elsewhere), overridden by CDC_WORKER__SECTION__KEY
# environment variables. Deployment: docs/deployment.md.

# ---------------------------------------------------------------- build
# The full (non-slim) image carries gcc/g++ and make, which DuckDB's bundled C++ and
# aws-lc-sys need.
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Dependency layer: build every crate of Cargo.lock against stub sources, so the long
# dependency build (DuckDB above all) is cached until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. config/default.toml is compiled into the binary (include_str!).
# touch: COPY keeps the files' modification times, which may be older than the stub
# build's, and cargo would then keep the stub binary.
COPY config ./config
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin cdc-worker \
    && cp target/release/cdc-worker /usr/local/bin/cdc-worker

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim

# Only CA certificates (TLS to AWS and Firebolt); libstdc++ and libgcc, which the bundled
# DuckDB links, are already in the base image.
# DL3008 (pin apt versions) is ignored on purpose: Debian drops superseded versions from the
# archive when a security update lands, so a pin breaks the build; the bookworm-slim tag
# fixes the release, and rebuilding picks up the CA bundle's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cdc-worker \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --home-dir /var/lib/cdc-worker --create-home --shell /usr/sbin/nologin cdc-worker

COPY --from=builder /usr/local/bin/cdc-worker /usr/local/bin/cdc-worker
COPY config/default.toml /etc/cdc-worker/config.toml

ENV CDC_WORKER_CONFIG=/etc/cdc-worker/config.toml \
    CDC_WORKER__TELEMETRY__LISTEN=0.0.0.0:9090 \
    CDC_WORKER__TELEMETRY__LOG_FORMAT=json

# Writable home: relative paths (warehouse.duckdb.path) resolve here.
WORKDIR /var/lib/cdc-worker
USER 10001:10001

# /healthz, /readyz, /metrics
EXPOSE 9090

# SIGTERM: stop receiving, finish in-flight batches within worker.shutdown_timeout, release
# the rest. Give the container longer than that before SIGKILL (docker stop -t, ECS stopTimeout).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["cdc-worker", "health"]

ENTRYPOINT ["cdc-worker"]
CMD ["run"]

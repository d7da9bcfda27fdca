# Keyhold in a container: the binary built in a Rust image, run alone from a slim Debian one
# as an unprivileged user. See the README, "Running it under systemd or in a container".
#
#   docker build -t keyhold .
#   docker run ... keyhold serve

FROM rust:1-bookworm AS build
# aws-lc-sys and the ML-KEM C code build with the image's C compiler; cmake for aws-lc.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin keyhold \
    && install -m 0755 target/release/keyhold /usr/local/bin/keyhold

FROM debian:bookworm-slim
# ca-certificates: the system roots for sslrootcert=system and https:// endpoints.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/keyhold --create-home \
       --shell /usr/sbin/nologin keyhold
COPY --from=build /usr/local/bin/keyhold /usr/local/bin/keyhold
USER 10001:10001
WORKDIR /var/lib/keyhold
# Off loopback, serve needs TLS (KEYHOLD_TLS_CERT_FILE, KEYHOLD_TLS_KEY_FILE) or, behind a
# TLS-terminating proxy, KEYHOLD_INSECURE_PLAINTEXT=true.
ENV KEYHOLD_LISTEN=0.0.0.0:50051 \
    KEYHOLD_LOG_FORMAT=json
# gRPC, and the metrics listener when KEYHOLD_METRICS_LISTEN=0.0.0.0:9464 is set.
EXPOSE 50051 9464
# No HEALTHCHECK: the image has no gRPC client; probe grpc.health.v1.Health from the
# orchestrator (Kubernetes grpc probes, grpc_health_probe), which follows the database.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/keyhold"]
CMD ["serve"]

# syntax=docker/dockerfile:1
# The nodeport-firewall operator image: a release build of the `nodeport-firewall` binary on
# a distroless base (glibc, CA certificates, no shell, no package manager), running as the
# non-root user 65532. The Helm chart and kustomize base add a read-only root filesystem.
#
#   docker build -t nodeport-firewall:dev .
#
# Reproducible: the toolchain and base images are pinned by tag (pin them by digest for
# releases), dependencies by Cargo.lock (--locked), and timestamps by SOURCE_DATE_EPOCH.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    SOURCE_DATE_EPOCH=0
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nodeport-firewall \
    && install -D -m 0755 target/release/nodeport-firewall /out/nodeport-firewall

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="nodeport-firewall" \
      org.opencontainers.image.description="Opens cloud firewall ports for Kubernetes NodePort Services, per node pool, and nothing else." \
      org.opencontainers.image.source="https://github.com/nodeport-firewall/nodeport-firewall" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/nodeport-firewall /usr/local/bin/nodeport-firewall
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/nodeport-firewall"]
CMD ["run", "--config", "/etc/nodeport-firewall/config.yaml"]

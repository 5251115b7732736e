# syntax=docker/dockerfile:1
#
# nodedns container image.
#
#   docker build -t nodedns:dev --build-arg REVISION=$(git rev-parse HEAD) .
#   docker build --target inject -t nodedns-inject:dev .     # the admission webhook
#
# Four stages:
#   build   Debian 12 + Rust: `cargo build --release --locked`, the same release
#           profile (LTO, codegen-units = 1) the benchmarks measure.
#   rootfs  Debian 12 slim with iptables and nftables installed, from which
#           deploy/image/stage-rootfs.sh copies only what nodedns needs.
#   inject  scratch + nodedns-inject and glibc: the admission webhook's image
#           (deploy/webhook). A binary and an image of its own, so the DaemonSet's
#           binary does not carry the webhook's TLS and HTTP code (28% of it).
#   final   scratch + that tree (about 8 MB besides nodedns): nodedns, glibc,
#           iptables-nft/-legacy, nft and their libraries. No shell, no apt.
#
# Why not a distroless base: none carries both iptables backends and nft, and
# distroless-iptables is built from the same Debian packages as this rootfs
# stage. Building the tree ourselves keeps the build stage and the runtime on
# one glibc (Debian 12) and lets tests/deploy/test_image.py rebuild the exact
# tree and run it under chroot on a machine without a container engine.
#
# The binary links glibc dynamically (ldd lists libc, libm, libgcc_s and the
# loader); the rootfs carries them. A static musl build would differ from the
# build the benchmarks measure.

# The release rust-toolchain.toml pins.
ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# The git revision for coredns_build_info{revision} (.git is not in the context).
ARG REVISION=unknown
ENV NODEDNS_REVISION=${REVISION}
WORKDIR /src
# .dockerignore admits only the crate's sources, so this layer changes only when
# the code does.
COPY . .
RUN cargo build --release --locked --bin nodedns --bin nodedns-inject \
    && install -D -m 0755 target/release/nodedns /out/nodedns \
    && install -D -m 0755 target/release/nodedns-inject /out/nodedns-inject

FROM docker.io/library/debian:${DEBIAN_RELEASE}-slim AS rootfs
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/image/stage-rootfs.sh /usr/local/bin/stage-rootfs
COPY --from=build /out/nodedns /tmp/nodedns
COPY --from=build /out/nodedns-inject /tmp/nodedns-inject
RUN /usr/local/bin/stage-rootfs /tmp/nodedns /rootfs \
    && /usr/local/bin/stage-rootfs --no-firewall /tmp/nodedns-inject /inject-rootfs

# The admission webhook: runs as 65532 with nothing but its binary and glibc.
FROM scratch AS inject
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="nodedns-inject" \
      org.opencontainers.image.description="Admission webhook that points pods at the nodedns node-local DNS cache" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="scratch" \
      org.opencontainers.image.source="${SOURCE_URL}"
COPY --from=rootfs /inject-rootfs/ /
USER 65532:65532
# checkov:skip=CKV_DOCKER_2:readiness is checked by the kubelet's HTTP probes, and the image has no client to run one
ENTRYPOINT ["/usr/bin/nodedns-inject"]

FROM scratch
ARG VERSION=0.1.0
ARG REVISION=unknown
# Set at release time, e.g. --build-arg SOURCE_URL=https://example.org/nodedns.git
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="nodedns" \
      org.opencontainers.image.description="Node-local DNS cache for Kubernetes, a drop-in replacement for NodeLocal DNSCache" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="scratch" \
      org.opencontainers.image.source="${SOURCE_URL}"
COPY --from=rootfs /rootfs/ /
# Non-root by default. The DaemonSet runs it as root with only NET_ADMIN and
# NET_BIND_SERVICE (see deploy/base/daemonset.yaml for why); without node setup
# (--setup-interface/--setup-iptables off, an unprivileged port) the default
# user is enough.
USER 65532:65532
# Kubernetes probes /health and /ready; a HEALTHCHECK would need a shell or
# curl in the image.
# checkov:skip=CKV_DOCKER_2:health is checked by the kubelet's HTTP probes, and the image has no client to run one
ENTRYPOINT ["/usr/bin/nodedns"]

# syntax=docker/dockerfile:1
# Image of the wsgate gateway. Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t wsgate:dev .
# Multi-stage: a Rust build stage, then a distroless runtime that holds only the binary and runs
# as the unprivileged user 65532 (matching the pods' runAsUser).

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Shown by /api/stats and the status page: --build-arg WSGATE_GIT_COMMIT=$(git rev-parse --short HEAD)
ARG WSGATE_GIT_COMMIT=""
# Cache mounts keep the registry and target/ between builds; the binary is copied out of the
# cached target/ because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wsgate --bin wsgate \
    && install -D -m 0755 target/release/wsgate /out/wsgate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wsgate /usr/local/bin/wsgate
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/wsgate"]

# syntax=docker/dockerfile:1
# Image of wsgate-operator. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t wsgate-operator:dev .
# Multi-stage: a Rust build stage, then a distroless runtime that holds only the binary and runs
# as the unprivileged user 65532 (matching the pods' runAsUser).

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target/ between builds; the binary is copied out of the
# cached target/ because cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wsgate-operator --bin wsgate-operator \
    && install -D -m 0755 target/release/wsgate-operator /out/wsgate-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/wsgate-operator /usr/local/bin/wsgate-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/wsgate-operator"]

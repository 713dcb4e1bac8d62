# Multi-stage build of the binaries (order-operator, order-worker, orderctl)
# into a small non-root runtime image.
#   docker build -t orderpipeline:dev .
FROM rust:1.95-bookworm AS build
# The commit the binaries report (--version): there is no .git in the build
# context; hack/image passes it.
ARG GIT_COMMIT=unknown
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY protocol protocol
COPY common common
COPY operator operator
COPY worker worker
COPY ctl ctl
COPY e2e e2e
RUN ORDERPIPELINE_GIT_COMMIT="$GIT_COMMIT" cargo build --release --locked -p order-operator -p order-worker -p orderpipeline-ctl \
 && mkdir -p /out \
 && cp target/release/order-operator target/release/order-worker target/release/orderctl /out/

FROM gcr.io/distroless/cc-debian12:nonroot
# The release (the workspace's version: make release-check keeps them equal).
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="orderpipeline" \
      org.opencontainers.image.description="The OrderPipeline operator, its worker and orderctl" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$GIT_COMMIT" \
      org.opencontainers.image.source="https://github.com/orderpipeline/orderpipeline" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/order-operator /out/order-worker /out/orderctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/order-worker"]

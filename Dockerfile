# Multi-stage build of the binaries (order-operator, order-worker, orderctl)
# into a small non-root runtime image.
#   docker build -t orderpipeline:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY protocol protocol
COPY common common
COPY operator operator
COPY worker worker
COPY ctl ctl
COPY e2e e2e
RUN cargo build --release --locked -p order-operator -p order-worker -p orderpipeline-ctl \
 && mkdir -p /out \
 && cp target/release/order-operator target/release/order-worker target/release/orderctl /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/order-operator /out/order-worker /out/orderctl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/order-worker"]

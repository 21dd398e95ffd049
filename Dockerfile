# Multi-stage build of every Flota binary; one image, the command picks the role.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY shared shared
COPY worker worker
COPY scheduler scheduler
COPY gpusim gpusim
COPY tests tests
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 flota
COPY --from=build /src/target/release/flota-worker /src/target/release/flota-scheduler \
     /src/target/release/flotactl /src/target/release/flota-gpusim /usr/local/bin/
USER flota
ENV FLOTA_LOG_FORMAT=json
CMD ["flota-worker"]

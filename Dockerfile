# Build: docker build -t bunq-session-worker .
# One image for the worker and its helpers: `bunq-session-worker` (run), `… demo`, `… samples`,
# `… emulator`. .ci/build-context-check builds from exactly the files copied below.
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake clang && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Cargo.toml declares the bench target; cargo refuses a manifest whose targets are missing.
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin bunq-session-worker

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/bunq-session-worker --create-home worker
COPY --from=build /src/target/release/bunq-session-worker /usr/local/bin/bunq-session-worker
USER 10001
WORKDIR /var/lib/bunq-session-worker
ENV BUNQ_CONTEXT_FILE=/var/lib/bunq-session-worker/bunq-context.json
ENTRYPOINT ["/usr/local/bin/bunq-session-worker"]

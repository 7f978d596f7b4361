# ffpush on Cloud Run: `gcloud builds submit --tag IMAGE` (deploy/deploy.sh) or
# `docker build -t ffpush .` builds it.

# --- build ---
FROM rust:1-bookworm AS builder
WORKDIR /app

# Dependencies first, against a dummy crate: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
# touch: the copied sources may be older than the dummy build, and cargo compares mtimes.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

# --- run ---
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin ffpush
COPY --from=builder /app/target/release/ffpush /usr/local/bin/ffpush
USER 10001
# Cloud Run sets PORT itself; this is the default for `docker run`.
ENV PORT=8080
EXPOSE 8080
ENTRYPOINT ["ffpush", "run"]

# Sluice in a container: `docker compose up --build` (see docker-compose.yml).
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      mold clang libclang-dev pkg-config build-essential zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sluice

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
COPY pipelines /app/pipelines
WORKDIR /app
ENTRYPOINT ["sluice"]
CMD ["run", "pipelines/kafka-quickstart.yaml"]

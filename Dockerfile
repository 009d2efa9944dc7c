# The tekton-step-observer image: one static (musl) binary on distroless.
#   docker build -t ghcr.io/tekton-step-observer/tekton-step-observer:dev .
# config/ deploys ghcr.io/tekton-step-observer/tekton-step-observer:latest;
# point it elsewhere with kustomize `images:` (see config/base/kustomization.yaml).

# Keep this tag equal to the channel pinned in rust-toolchain.toml. That file
# is deliberately not copied in: the image's own toolchain is the pinned one,
# and rustup then has nothing to download.
FROM rust:1.95.0-bookworm AS builder

# musl makes the binary static, so the final image needs no libc; musl-tools
# provides musl-gcc for the C parts of dependencies (ring).
ARG TARGET=x86_64-unknown-linux-musl
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add "${TARGET}"

WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when a manifest
# or the lock file changes. The workspace's crates are stand-ins here (cargo
# needs every member's manifest and declared targets to exist).
COPY Cargo.toml Cargo.lock ./
COPY hack/node-agent/Cargo.toml hack/node-agent/Cargo.toml
RUN mkdir -p src benches hack/node-agent/src/bin \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/decide.rs \
    && echo 'fn main() {}' > hack/node-agent/src/main.rs \
    && echo 'fn main() {}' > hack/node-agent/src/bin/simulated_step.rs \
    && touch hack/node-agent/src/lib.rs \
    && cargo build --release --locked --target "${TARGET}" -p tekton-step-observer \
    && rm -rf src benches hack/node-agent/src

# Then the crate itself.
COPY src src
COPY benches benches
COPY hack/node-agent/src hack/node-agent/src
# COPY keeps the files' modification times, which may be older than the
# stand-ins' build; without the touch cargo could ship the empty stand-in.
RUN touch src/lib.rs src/main.rs \
    && cargo build --release --locked --target "${TARGET}" -p tekton-step-observer --bin tekton-step-observer \
    && cp "target/${TARGET}/release/tekton-step-observer" /tekton-step-observer

# distroless/static: CA certificates, /etc/passwd with the nonroot user, and
# nothing else (no shell, no package manager).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=builder /tekton-step-observer /tekton-step-observer
# The "nonroot" user; the Deployment also enforces runAsUser 65532.
USER 65532:65532
ENTRYPOINT ["/tekton-step-observer"]
CMD ["run"]

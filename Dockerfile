# syntax=docker/dockerfile:1
# The agent's image: `cargo xtask image` builds it (README, "Container image"). The DaemonSet
# (deploy/kubernetes/03-daemonset.yaml) runs it as `agent run --config /etc/agent/policy.yaml`.

# Both stages start from Debian. `cargo xtask image` passes another base (a stand-in it
# bootstraps from Debian's archive) when this one cannot be had.
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

# Build: rustup's stable Rust, then what `cargo xtask setup` installs on a developer's machine
# for a build (nightly, rust-src, bpf-linker against the nightly's libLLVM: only the xtask code
# knows versions), then the release agent with its eBPF object.
FROM ${DEBIAN_IMAGE} AS build
# gcc and libc6-dev: the linker rustc calls, and the C parts of build scripts. curl fetches
# rustup. ca-certificates also takes in any *.crt that the build mounts at
# /usr/local/share/ca-certificates (`cargo xtask image` mounts the host's there).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    AGENT_TOOLCHAIN_DIR=/usr/local/agent-toolchain \
    PATH=/usr/local/cargo/bin:$PATH
# The nightly to build with (`nightly-YYYY-MM-DD`; `cargo xtask image` passes the host's);
# empty: whatever rustup's nightly is that day.
ARG AGENT_NIGHTLY=
WORKDIR /src
COPY . .
# The toolchains, the crates and the build directory are cache mounts, kept by the builder
# across builds: after a change of the sources every setup step says `skipped` and cargo
# builds only what changed. Hence rustup is installed here, when the cache has none. The
# agent is copied out to /out/agent: nothing of a cache mount stays in the stage.
RUN --mount=type=cache,target=/usr/local/rustup \
    --mount=type=cache,target=/usr/local/cargo \
    --mount=type=cache,target=/usr/local/agent-toolchain \
    --mount=type=cache,target=/src/target \
    if ! command -v rustup >/dev/null; then \
      curl --proto '=https' --tlsv1.2 -sSf -o /tmp/rustup-init \
        "https://static.rust-lang.org/rustup/dist/$(uname -m)-unknown-linux-gnu/rustup-init" \
      && chmod +x /tmp/rustup-init \
      && /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain stable \
      && rm /tmp/rustup-init; \
    fi \
 && cargo xtask image --build-stage /out/agent

# Run: glibc and libgcc_s are all the agent links against (`ldd`). It speaks netlink itself
# (no iproute2) and serves plain HTTP (no CA certificates).
FROM ${DEBIAN_IMAGE}
COPY --from=build /out/agent /usr/local/bin/agent
ENTRYPOINT ["/usr/local/bin/agent"]
CMD ["run", "--config", "/etc/agent/policy.yaml"]

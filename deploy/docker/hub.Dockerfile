# The Gantry hub: API, dashboard and the QUIC endpoint for agents, one process.
#
# The image copies prebuilt binaries; nothing is compiled inside it. Build them on Debian
# bookworm (or an older glibc) so they run on the base image, then build from this folder:
#
#   cargo build --profile dist -p gantry-hub && cargo build --profile dist-agent -p gantry-agent
#   mkdir -p deploy/docker/bin
#   cp target/dist/gantry-hub target/dist-agent/gantry-agent deploy/docker/bin/
#   docker build -f deploy/docker/hub.Dockerfile -t gantry-hub deploy/docker
#
# BASE_IMAGE is any Debian-like image with bash and useradd (default: debian:bookworm-slim).
# The agent binary is shipped beside the hub so that the hub serves it at /downloads/ and
# install.sh can install it (`installer.serve_own_agent`).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

RUN groupadd --system --gid 10001 gantry \
    && useradd --system --uid 10001 --gid gantry --home-dir /var/lib/gantry-hub --no-create-home --shell /usr/sbin/nologin gantry \
    && mkdir -p /var/lib/gantry-hub /etc/gantry \
    && chown gantry:gantry /var/lib/gantry-hub \
    && chmod 0700 /var/lib/gantry-hub

COPY bin/gantry-hub bin/gantry-agent /usr/local/bin/
COPY hub-entrypoint.sh /usr/local/bin/gantry-hub-entrypoint
COPY healthcheck.sh /usr/local/bin/gantry-healthcheck

# The entrypoint initialises DATA on first start (GANTRY_PUBLIC_ADDR is then required) and
# passes /etc/gantry/hub.toml to `serve` when it exists. Everything else is configured with
# GANTRY_* variables (README.md, "Configure").
ENV GANTRY_DATA=/var/lib/gantry-hub \
    GANTRY_HTTP_ADDR=0.0.0.0:8080 \
    GANTRY_QUIC_ADDR=0.0.0.0:7443
VOLUME ["/var/lib/gantry-hub"]
# HTTP: API, dashboard, /healthz, /readyz, /metrics. UDP: QUIC for agents.
EXPOSE 8080/tcp 7443/udp
USER gantry:gantry
WORKDIR /var/lib/gantry-hub
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/gantry-healthcheck"]
ENTRYPOINT ["/usr/local/bin/gantry-hub-entrypoint"]
CMD ["serve"]

# The Gantry agent, for hosts where it runs as a container (the Helm chart's DaemonSet, or
# `docker run`). On a plain VPS prefer install.sh, which installs the binary as a systemd
# service.
#
# The image copies a prebuilt binary; nothing is compiled inside it:
#
#   cargo build --profile dist-agent -p gantry-agent
#   mkdir -p deploy/docker/bin
#   cp target/dist-agent/gantry-agent deploy/docker/bin/
#   docker build -f deploy/docker/agent.Dockerfile -t gantry-agent deploy/docker
#
# It runs as root: it reads the Docker socket and applies deployments through it. Give it
# the host's view with `--pid host --network host`, the socket with
# `-v /var/run/docker.sock:/var/run/docker.sock`, and keep its identity in a volume on
# /var/lib/gantry-agent so a restarted container is the same agent.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

COPY bin/gantry-agent /usr/local/bin/gantry-agent
COPY agent-entrypoint.sh /usr/local/bin/gantry-agent-entrypoint

# On first start the entrypoint enrolls with GANTRY_TOKEN (plus GANTRY_LABELS, `k=v`
# separated by spaces); later starts reuse the identity in the state directory. A config
# file at /etc/gantry/agent.toml is passed to `run` when it exists.
ENV GANTRY_STATE_DIR=/var/lib/gantry-agent
VOLUME ["/var/lib/gantry-agent"]
ENTRYPOINT ["/usr/local/bin/gantry-agent-entrypoint"]
CMD ["run"]

# syntax=docker/dockerfile:1
# Multi-stage: build the wheel (native engine + generated stubs) with the
# toolchain, then a slim runtime with the external proxies s2cs can drive.

FROM python:3.11-slim-bookworm AS build
# libipsec-mb-dev (x86-64 only): AES-GCM with VAES for the TLS leg, csrc/aesgcm.c.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libssl-dev \
    $([ "$(dpkg --print-architecture)" = amd64 ] && echo libipsec-mb-dev) \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY csrc csrc
COPY scistream scistream
# The build must produce the native engine; a fallback to pure Python is an error here.
RUN SCISTREAM_REQUIRE_NATIVE=1 pip wheel --no-deps -w /wheels .

FROM python:3.11-slim-bookworm AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 $([ "$(dpkg --print-architecture)" = amd64 ] && echo libipsec-mb1) stunnel4 haproxy iperf3 nginx-light libnginx-mod-stream socat iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && python -c "import scistream.dataplane.native"
RUN useradd --system --home /var/lib/scistream --create-home scistream
COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/scistream-entrypoint
USER scistream
ENV SCISTREAM_STATE_DIR=/var/lib/scistream
VOLUME ["/var/lib/scistream"]
# control (gRPC) and the 1.x default data port range
EXPOSE 5000 5100-5200
# The image's s2cs listens with control-channel TLS from /etc/scistream/server.{crt,key}
# (mount them); the health check pins the same certificate.
ENV SCISTREAM_HEALTH_S2CS=127.0.0.1:5000 SCISTREAM_HEALTH_CERT=/etc/scistream/server.crt
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s CMD ["scistream", "health"]
# s2cs advertises its listener address to peers: the host's reachable address, which the
# image cannot know. Run with --network host -e SCISTREAM_LISTENER_IP=<that address>; the
# entry point refuses to start without it (or a --listener-ip argument).
ENTRYPOINT ["scistream-entrypoint"]
CMD ["--port", "5000", "--server_crt", "/etc/scistream/server.crt", "--server_key", "/etc/scistream/server.key"]

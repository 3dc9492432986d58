# A local stand-in for prom/prometheus, for machines that cannot pull it (scripts/container_engine.sh
# builds it only when the tag is missing): Debian's prometheus package (2.42 in bookworm), with the
# official image's interface: ENTRYPOINT prometheus, data in /prometheus, runs as nobody, wget for
# the healthcheck.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && mkdir -p /prometheus /etc/prometheus \
 && chown nobody:nogroup /prometheus
LABEL org.opencontainers.image.description="local stand-in for prom/prometheus: Debian's prometheus package"
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]

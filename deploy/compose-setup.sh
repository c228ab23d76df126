#!/bin/sh
# One-shot setup for deploy/compose.yaml: the first platform-admin token and a join token for the
# simulated agents, written to the shared volume. Safe to run again: it reuses what it made.
set -eu
if [ ! -s /shared/admin-token ]; then
  fairgpu admin bootstrap --quiet > /shared/admin-token
fi
export FAIRGPU_TOKEN="$(cat /shared/admin-token)"
if [ ! -s /shared/join-token ]; then
  fairgpu join-token create --uses 100 --quiet > /shared/join-token
fi
chmod 0644 /shared/join-token
echo "platform-admin token: $FAIRGPU_TOKEN"
echo "use it with: fairgpu login --server http://localhost:8080 --token $FAIRGPU_TOKEN"

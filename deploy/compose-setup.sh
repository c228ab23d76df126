#!/bin/sh
# One-shot setup for deploy/compose.yaml: the first platform-admin token and a join token for the
# simulated agents, written to the shared volume. Safe to run again: it reuses what it made.
set -eu
if [ ! -s /shared/admin-token ]; then
  # --force: the volume may be new while the database is not (a token is then issued again).
  fairgpu admin bootstrap --name admin --force | tail -n 1 > /shared/admin-token
fi
FAIRGPU_TOKEN="$(cat /shared/admin-token)"
export FAIRGPU_TOKEN
if [ ! -s /shared/join-token ]; then
  fairgpu join-token create --name compose-agents --uses 100 | tail -n 1 > /shared/join-token
fi
chmod 0600 /shared/admin-token
chmod 0644 /shared/join-token
echo "platform-admin token: $FAIRGPU_TOKEN"
echo "use it with: fairgpu login --server http://localhost:8080 --token $FAIRGPU_TOKEN"

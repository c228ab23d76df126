"""The server's side of the agent heartbeat, in one place.

- service.py: `Heartbeats.answer`, the one entry point (the router and the direct route call it)
- classify.py: quiet or full, pure
- read.py: the node's rows the classification needs, as named rows
- full.py: the full transactional path (samples, task reports, logs, work for the node)
- buffer.py: quiet heartbeats' liveness and samples, flushed in batches
- events.py: the one writer of node-state and GPU-health events
- longpoll.py: holding a heartbeat until the node has work
"""

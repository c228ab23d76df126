"""What the server and the node agents share: the agent wire models, their limits and states."""

"""Pure scheduling policy: a cluster snapshot in, decisions out (no I/O, no clock)."""

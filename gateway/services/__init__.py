"""Use cases: connect, inbound, outbound, history, and the background workers."""

"""Federated simulation: rounds, client training, aggregation and client state."""

"""Flower integration (planned): the same client-training routine inside a ClientApp."""

"""Tessera: federated learning with DP-SGD and dropout-tolerant secure aggregation."""

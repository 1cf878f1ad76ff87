"""Model-family adapters: how FlowCut enters each supported model (no copy of the algorithm here)."""

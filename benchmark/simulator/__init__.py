"""Discrete-event simulator of N lockstep DP-attention + EP instances (see sim.py)."""

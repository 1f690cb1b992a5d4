"""NanoCP front router: cluster state, DCP planner and baseline policies, ZMQ dispatch.

Pure Python (no torch) so it can run on a CPU-only node.
"""

__version__ = "0.1.0"

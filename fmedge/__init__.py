"""fm-edge: run FlowMason pipelines on edge devices, offline first."""

__version__ = "0.1.0"

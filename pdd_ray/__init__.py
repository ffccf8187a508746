"""pdd_ray: Progressive Dataset Distillation (PDD) on Ray."""

__version__ = "0.1.0"

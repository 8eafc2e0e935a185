"""tpr_core: the pure-PyTorch library of tpr (data formats, models, losses, metrics).

It never imports ray, deepspeed, mlflow or pipelines (tests/test_import_boundary.py).
"""

__version__ = "0.1.0"

"""Pure torch/transformers/peft parts of LBR: model, losses, objectives, readers, negatives, metrics.

No Ray, DeepSpeed or torch.distributed imports here (a test walks the AST to keep it so).
"""
from stages.model import LBRConfig, LBRModel

__all__ = ["LBRConfig", "LBRModel"]

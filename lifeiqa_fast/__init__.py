"""lifeiqa_fast: Life-IQA blind image quality assessment with fused kernels for its head."""
from . import _ext  # loads the compiled ops first (warns once if they are unavailable)
from . import ops, reference
from ._version import __version__
from .export import export_onnx  # imports onnx only when called
from .info import info
from .loss import QualityLoss, training_loss
from .checkpoint import load_checkpoint, save_checkpoint
from .convert import optimize
from .model import LifeIQA
from .pretrained import from_pretrained, save_pretrained
from .scorer import Scorer
from .ops import get_default_impl, set_default_impl

__all__ = ["LifeIQA", "QualityLoss", "Scorer", "__version__", "export_onnx", "from_pretrained", "get_default_impl",
           "info", "load_checkpoint", "ops", "optimize", "reference", "save_checkpoint", "save_pretrained",
           "set_default_impl", "training_loss"]

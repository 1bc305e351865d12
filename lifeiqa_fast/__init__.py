"""lifeiqa_fast: Life-IQA blind image quality assessment with fused kernels for its head."""
from . import _ext  # loads the compiled ops first (warns once if they are unavailable)
from . import ops, reference
from ._version import __version__
from .info import info
from .model import LifeIQA, load_checkpoint, optimize, save_checkpoint
from .scorer import Scorer
from .ops import get_default_impl, set_default_impl

__all__ = ["LifeIQA", "Scorer", "__version__", "get_default_impl", "info", "load_checkpoint", "ops", "optimize",
           "reference", "save_checkpoint", "set_default_impl"]

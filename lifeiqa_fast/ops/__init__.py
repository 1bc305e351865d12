"""The fused op families of Life-IQA's head. Each takes impl="auto" | "reference" | "native" | "triton"
(None: the process-wide default, see set_default_impl)."""
from ._impl import IMPLS, get_default_impl, set_default_impl
from .cross_attention import attend_memory, cross_attention, cross_attention_op
from .gcn import gcn
from .grid_pool import grid_pool
from .moe import moe

__all__ = ["IMPLS", "attend_memory", "cross_attention", "cross_attention_op", "gcn", "get_default_impl", "grid_pool",
           "moe", "set_default_impl"]

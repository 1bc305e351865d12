"""Triton kernel of cross_attention (being written)."""


def cross_attention_forward(x, kv, norm_weight, norm_bias, q_weight, q_bias, out_weight, out_bias, num_heads, eps):
    raise NotImplementedError("the Triton cross_attention kernel is being written")

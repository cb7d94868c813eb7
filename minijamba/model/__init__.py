"""The reference model, for reading: plain PyTorch, one concept per file, in this order.

    config.py      JambaConfig: every size, and the layer layout in the paper's terms (l, a:m, e, n, K)
    norm.py        RMSNorm
    ssm.py         the selective scan (sequential and parallel), the decoding step, the causal conv
    mamba.py       the Mamba layer as Jamba uses it (RMSNorm on Δ, B, C)
    attention.py   causal grouped-query attention without positional encoding, with a KV cache
    moe.py         the dense MLP, the top-K router, the experts, the load-balancing loss
    jamba.py       decoder layers, the block layout, embedding, LM head, the loss
    state.py       the inference state: KV caches, conv and SSM states
    dispatch.py    the one door to the fast side: named primitives and their references

Nothing here imports the fast side (minijamba.kernels): faster twins of the primitives register
themselves with `dispatch`, and the model code calls the primitives by name.
"""

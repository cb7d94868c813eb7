"""The released Jamba models' configurations, by name, for `JambaConfig.from_preset(name)`.

Each entry is the architecture part of the release's `config.json`, under transformers' field names,
with the source it was read from. The file itself could not always be read (this project runs
offline and the hub's files are not mirrored): where a value comes from a copy, the paper or
arithmetic, the comment says so, and tests/test_presets.py holds each preset to its published
parameter count. A field left out takes JambaConfig's default, which is Jamba-v0.1's.

    name                 total / active parameters    layers  width  layout
    jamba-v0.1           51.57B / 12.11B              32      4096   l=8 a:m=1:7 e=2 n=16 K=2
    jamba-1.5-mini       the same shape (1.6 and 1.7 Mini keep it), end tokens [2, 518]
    jamba2-mini          the same shape, end token 519
    jamba-1.5-large      398B / 94B                   72      8192   l=8 a:m=1:7 e=2 n=16 K=2
    jamba-reasoning-3b   3.03B, dense                 28      2560   attention at layers 7 and 21
    jamba-tiny-dev       319M                         16      512    l=8 a:m=1:7 e=2 n=8 K=2
    tiny                 minijamba's own: trains on a laptop CPU
"""

from __future__ import annotations

# Jamba-v0.1's shape, which 1.5 Mini and Jamba2 Mini keep.
_MINI = dict(
    vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4,
    num_experts=16, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False, router_aux_loss_coef=0.001,
    max_position_embeddings=262144, pad_token_id=0, bos_token_id=1,
)  # fmt: skip

PRESETS: dict[str, dict] = {
    # ai21labs/Jamba-v0.1, config.json (huggingface.co/ai21labs/Jamba-v0.1/blob/main/config.json):
    # 51.57B total, 12.11B active parameters.
    "jamba-v0.1": dict(_MINI, eos_token_id=2),
    # ai21labs/AI21-Jamba-1.5-Mini: the same architecture as v0.1 (arXiv 2408.12570, section 2: "an
    # updated and instruction-tuned version" of Jamba); its config.json as copied in a public ONNX
    # test-model collection, and the 1.6 release's generation_config.json
    # (huggingface.co/ai21labs/AI21-Jamba-Large-1.6, commit fb8e9f8): end of text 2, end of turn 518.
    "jamba-1.5-mini": dict(_MINI, eos_token_id=[2, 518]),
    # ai21labs/AI21-Jamba2-Mini: its config.json as converted to MLX (huggingface.co/ssdataanalysis/
    # AI21-Jamba2-Mini-mlx-fp16, config.json, transformers 4.56.1): the v0.1 shape, end token 519.
    "jamba2-mini": dict(_MINI, eos_token_id=519),
    # ai21labs/AI21-Jamba-1.5-Large: arXiv 2408.12570, section 2: 9 blocks of l = 8 layers (72),
    # a:m 1:7, hidden 8192, 64 query heads and 8 key-value heads, MoE every e = 2 layers with n = 16
    # experts, top K = 2. The expert width 24576 (3 x 8192) is the one that gives the card's 398B
    # total and 94B active parameters (398.6B / 94.1B here); the Δ rank is the default ceil(8192 / 16).
    "jamba-1.5-large": dict(
        _MINI, hidden_size=8192, intermediate_size=24576, num_hidden_layers=72, num_attention_heads=64,
        num_key_value_heads=8, mamba_dt_rank=512, eos_token_id=[2, 518],
    ),
    # ai21labs/AI21-Jamba-Reasoning-3B: a dense Jamba (one MLP a layer, no experts), multi-query
    # attention (one key-value head), tied embeddings, attention at layers 7 and 21 (period 14,
    # offset 7), Δ rank 160; widths as in public ports of its config.json (hidden 2560, MLP 8192,
    # 20 heads, 28 layers), which give the card's 3.03B parameters exactly enough to round to it.
    "jamba-reasoning-3b": dict(
        _MINI, hidden_size=2560, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=1, attn_layer_period=14, attn_layer_offset=7, num_experts=1,
        num_experts_per_tok=1, mamba_dt_rank=160, tie_word_embeddings=True, eos_token_id=[2, 519],
    ),
    # ai21labs/Jamba-tiny-dev (a 319M model "for unit testing purposes", its card; trained on ~40B
    # tokens): 16 layers with attention at 4 and 12, 8 heads over 2 key-value heads of 64 (so hidden
    # 512), as a public port quotes its config.json; 8 experts of width 2048 give exactly the
    # 318,688,640 parameters counted at the hub's revision ed30336. Its generation_config.json ends
    # at token 2.
    "jamba-tiny-dev": dict(
        _MINI, hidden_size=512, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
        num_key_value_heads=2, num_experts=8, mamba_dt_rank=32, eos_token_id=2,
    ),
    # A scaled-down Jamba with the paper's layout (l=8, a:m=1:7, e=2, K=2) that trains on a laptop CPU.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_period=8, attn_layer_offset=4,
        num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, max_position_embeddings=4096,
    ),
}  # fmt: skip

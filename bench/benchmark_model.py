"""The project's benchmark model, shared by the bench scripts: its command-line flags and its
:class:`~sgpo_jax.models.DecoderConfig` (Llama, vocab 32000, hidden 256, intermediate 688,
4 layers, 8 heads, 4 KV heads, rope theta 1e4, fp32). Imports nothing heavy at module level, so
scripts can parse their flags before setting thread variables and importing jax."""

import argparse


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (the project's benchmark config)")
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--intermediate", type=int, default=688)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=4)
    g.add_argument("--rope-theta", type=float, default=1e4)


def model_config(args: argparse.Namespace, max_length: int, **overrides):
    """The DecoderConfig for ``args`` (head_dim = hidden / heads), positions up to ``max_length``."""
    from sgpo_jax.models import DecoderConfig

    return DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         rope_theta=args.rope_theta, rms_norm_eps=1e-6,
                         max_position_embeddings=max(2048, max_length), **overrides)

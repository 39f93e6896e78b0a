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


def cpu_thread_env(threads: int) -> None:
    """Pins XLA:CPU (``intra_op_parallelism_threads``) and OpenMP/MKL/OpenBLAS to ``threads`` and
    keeps transformers offline; call before jax or torch is imported."""
    import os

    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}").strip()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_llama_config(cfg, attn: str, **extra):
    """transformers' ``LlamaConfig`` of the DecoderConfig ``cfg`` (untied head), checked to
    round-trip back to ``cfg``; ``extra`` adds token ids and the like."""
    import transformers

    from sgpo_jax.models import DecoderConfig

    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation=attn, **extra)
    assert DecoderConfig.from_hf(hf_config, attention_block=cfg.attention_block) == cfg, \
        "the transformers config does not round-trip"
    return hf_config

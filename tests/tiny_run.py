"""A word-level tokenizer with a chat template, separable preference pairs and the tiny config:
the ingredients of end-to-end runs on CPU (training, the SSAPO loop, multi-process rehearsals)."""

import json
from pathlib import Path

import numpy as np

GOOD = [f"good{i}" for i in range(8)]
BAD = [f"bad{i}" for i in range(8)]
NEUTRAL = [f"word{i}" for i in range(16)]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
ROOT = Path(__file__).resolve().parents[1]


def write_tokenizer(path: Path) -> str:
    """Saves a word-level fast tokenizer (specials, good/bad/neutral words) to ``path``."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers

    specials = ["<pad>", "<unk>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab = {w: i for i, w in enumerate(specials + GOOD + BAD + NEUTRAL)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                eos_token="</s>", chat_template=TEMPLATE)
    fast.save_pretrained(path)
    return str(path)


def write_pairs(path: Path, count: int = 40, seed: int = 0) -> str:
    """``count`` separable pairs: chosen responses use good words, rejected ones bad words."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(NEUTRAL, 4))
        rows.append({"prompt": prompt, "chosen": " ".join(rng.choice(GOOD, 5)),
                     "rejected": " ".join(rng.choice(BAD, 5))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny(tokenizer_dir, data_file, **overrides):
    """configs/tiny.py with the tokenizer and data set; ``group__field=value`` overrides."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from configs.tiny import get_config

    config = get_config()
    config.model.tokenizer = tokenizer_dir
    config.data.source = data_file
    for dotted, value in overrides.items():
        if "__" in dotted:
            group, field = dotted.split("__")
            config[group][field] = value
        else:
            config[dotted] = value
    return config


def write_ssapo_files(root: Path) -> dict:
    """Tokenizer, 40 pairs, 40 pool prompts and 4 held-out tasks under ``root``, for the SSAPO loop."""
    from sgpo_jax.ssapo.instructions import make_tasks

    rng = np.random.default_rng(1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(NEUTRAL, 4))}) + "\n" for _ in range(40)))
    tasks = root / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t.to_json()) + "\n" for t in make_tasks(4, seed=0)))
    return dict(tokenizer=write_tokenizer(root / "tokenizer"), data=write_pairs(root / "prefs.jsonl", 40),
                prompts=str(prompts), tasks=str(tasks))


def ssapo_config(files: dict, **overrides):
    """The tiny config in train.mode=ssapo: seed 16, pools 8 + 8, 6 new tokens, the authors' follower."""
    settings = dict(train__mode="ssapo", train__epochs=1, ssapo__prompts=files["prompts"], ssapo__seed_size=16,
                    ssapo__pool_sizes=(8, 8), ssapo__seed_epochs=2, ssapo__generation_batch_size=4,
                    ssapo__max_new_tokens=6, ssapo__temperature=1.0, sgpo__follower="annotation",
                    eval__tasks=files["tasks"], eval__max_new_tokens=6, eval__batch_size=4)
    return tiny(files["tokenizer"], files["data"], **{**settings, **overrides})

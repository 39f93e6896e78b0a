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

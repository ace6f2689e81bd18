"""Tokenizers: load a checkpoint folder's tokenizer (local files only), and build a real
byte-level BPE tokenizer for the tiny test checkpoints."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]

# Role tokens around each message; the prompt for a reply ends with <|assistant|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# A small deterministic corpus: English prose, code and numbers, enough to learn common merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts out of many, so each token pays for a small part of the model while the model keeps a
large capacity. Serving such a model well means batching many requests, keeping the key-value
cache in fixed-size blocks, and moving tokens between GPUs only when they must travel.
def forward(self, hidden_states, positions):
    residual = hidden_states
    hidden_states = self.norm(hidden_states)
    return self.mlp(hidden_states) + residual
for i in range(10): print(i, i * i, "hello world")
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096 8192.
Questions and answers: What is the capital of France? Paris. How many experts? Two hundred and fifty six.
The engine schedules requests, the scheduler picks what runs, and the runner builds the batch.
"""


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab_size` entries (256 bytes + specials + merges)."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    # The corpus may yield fewer merges than asked for: pad with unused tokens to the exact size.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|unused_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (with chat template), loadable by AutoTokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_tokenizer(model_dir: str):
    """The checkpoint folder's tokenizer through transformers; never fetched from a hub."""
    from transformers import AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")) and not os.path.isfile(
            os.path.join(model_dir, "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer.json / tokenizer_config.json in {model_dir!r}")
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

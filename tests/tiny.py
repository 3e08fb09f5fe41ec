"""Tiny models with random weights, built from configs, and small corpora made in code."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("the cat dog sat on mat a red blue green fox jumps over lazy river stone tree bird sings "
         "loud quiet house under above zero one two three four five six seven eight nine ten "
         "def class return import print yield lambda while for if else").split()


def corpus_texts(n_docs: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "." for _ in range(n_docs)]


def make_tokenizer(texts: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")


def make_config(arch: str, vocab_size: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=vocab_size, n_inner=72)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=128,
                           bos_token_id=0, eos_token_id=0)
    if arch == "neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                             vocab_size=vocab_size, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def make_model(arch: str, out: Path, seed: int = 0, texts: list[str] | None = None, **config) -> Path:
    """Save a random-weight model of `arch` with a small BPE tokenizer into `out`; `config`
    overrides fields of its config (n_layer=12, ...)."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(texts or corpus_texts())
    torch.manual_seed(seed)
    cfg = make_config(arch, len(tok))
    for key, value in config.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init gives small activations; scale weights up so that GELU/SiLU see their nonlinear range.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

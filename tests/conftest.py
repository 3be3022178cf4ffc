"""Shared fixtures: tiny but real causal LMs with tokenizers trained in-process (no hub downloads).

``tiny_gpt2_path`` and ``tiny_llama_path`` are folders written with ``save_pretrained``, so code under
test loads them exactly as it would load a real checkpoint (``AutoModelForCausalLM.from_pretrained``).

- GPT-2: byte-level BPE, ``<|endoftext|>`` as BOS/EOS/pad, no chat template (a base model).
- Llama: byte-level BPE with ``<s>`` prepended by the tokenizer, ``</s>`` EOS, ``<pad>`` pad, and a chat
  template that itself starts with ``<s>`` (as real chat templates do), untied LM head.

The vocabularies are small (~120 tokens) so random-init models hit EOS now and then within a few dozen
tokens, which lets tests exercise EOS handling without touching the weights.
"""

from __future__ import annotations

import pytest
import torch

# Tiny models on a shared 2-core machine: intra-op threads only add synchronisation cost (measured: a
# 32x64 linear layer is ~150x slower with 2 contended threads than with 1).
torch.set_num_threads(1)

TINY_CORPUS = [
    "What is 2 + 3? The answer is 5.",
    "Compute 7 * 6 and put the result in \\boxed{42}.",
    "<|user|>Solve x + 1 = 4.\n<|assistant|>x = 3, so the answer is \\boxed{3}.",
    "def add(a, b):\n    return a + b",
    "the quick brown fox jumps over the lazy dog; THE QUICK BROWN FOX!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 and symbols ( ) [ ] { } = - / _ , . : ? ' \" # $ % & @ ^ ~ `",
    "Let us think step by step. First, add the numbers. Then, check the result.",
]

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tiny_tokenizer(special_tokens: list[str], vocab_size: int = 120, bos: str | None = None):
    """Byte-level BPE trained on ``TINY_CORPUS``; ``bos`` (if given) is prepended by ``add_special_tokens``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # no initial_alphabet: only the bytes seen in the corpus, which keeps the vocabulary tiny
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False)
    tok.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = train_tiny_tokenizer(["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = train_tiny_tokenizer(["<s>", "</s>", "<pad>"], bos="<s>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)

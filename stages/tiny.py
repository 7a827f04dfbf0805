"""Build a tiny random Llama backbone with a locally trained BPE tokenizer — no downloads.

Why: tests, the laptop demo and benchmarks need a real `AutoModelForCausalLM` folder that loads like
any other backbone, in seconds, on CPU, offline.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

_WORDS = ["protein", "gene", "cell", "enzyme", "receptor", "kinase", "tumor", "cancer", "insulin", "glucose", "diabetes", "heart", "lung", "liver", "kidney", "brain", "neuron", "synapse", "dopamine", "serotonin", "virus", "bacteria", "infection", "antibiotic", "vaccine", "immune", "antibody", "molecule", "atom", "bond", "carbon", "oxygen", "nitrogen", "hydrogen", "acid", "base", "salt", "ester", "amine", "alcohol", "ketone", "aldehyde", "benzene", "ring", "polymer", "catalyst", "reaction", "solvent", "crystal", "ion", "electron", "orbital", "spectrum", "function", "class", "return", "value", "list", "dict", "string", "integer", "float", "loop", "index", "array", "parse", "file", "path", "socket", "thread", "lock", "queue", "module", "import", "decorator", "generator", "iterator", "exception", "error", "raise", "yield", "lambda", "closure", "scope", "buffer", "symptom", "treatment", "diagnosis", "therapy", "dose", "patient", "trial", "clinical", "chronic", "acute", "syndrome", "disorder", "rare", "inherited", "mutation", "chromosome", "protein", "folding", "membrane", "transport", "signal", "pathway", "metabolism", "oxidation"]


def synthetic_corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 24))) for _ in range(n)]


def build_tiny_backbone(out: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 1000,
                        hidden_size: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 512,
                        seed: int = 0, tie_embeddings: bool = False) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save a random Llama with it to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(texts) if texts is not None else synthetic_corpus()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      tie_word_embeddings=tie_embeddings)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out

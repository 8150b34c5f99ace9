"""Build the demo's tokenizer and tiny GPT-2 locally (nothing is downloaded).

The tokenizer is byte-level BPE, so any text encodes (no unknown tokens) and
decoding round-trips exactly; with the default vocabulary every word of the
synthetic task (training/synthetic.py) is one token. Special tokens are distinct: `<pad>` pads,
`<|endoftext|>` ends a response (and is the BOS, as in GPT-2), `<unk>` exists
for tools that expect one.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<|endoftext|>", "<unk>"


def build_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 1024
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on texts and save it to out_dir.

    vocab_size counts the 256 byte symbols and the 3 special tokens. Loadable
    with `AutoTokenizer.from_pretrained(out_dir)`; adds no special tokens when
    encoding (append eos yourself where a sequence must end).
    """
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=EOS, unk_token=UNK,
        padding_side="right",
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_tiny_lm(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path, n_layer: int = 2,
                  n_embd: int = 128, n_head: int = 4, n_positions: int = 128, seed: int = 0) -> Path:
    """Create a randomly initialised GPT-2 for tokenizer and save it (+ tokenizer) to out_dir.

    Dropout is off so that log-probs at generation and at training agree (PPO
    ratios start at exactly 1). About 0.5 M parameters at the defaults, which
    forward+backward a (64, 40) batch in well under 0.1 s on 2 CPU cores.
    Returns out_dir; load with `AutoModelForCausalLM.from_pretrained(out_dir)`.
    """
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    tokenizer.model_max_length = n_positions
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out

"""Texts, trainer settings and small models shared by the SFT and reward-model tests."""

import pathlib

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

from services.formatting import encode_sft_example
from services.models import sequence_classifier
from training import synthetic
from training.ds_trainer import TrainerConfig
from training.sft_objective import SFTObjective

OCEAN = "Describe the ocean for a child :\n"
GOOD = "first , the ocean has waves and coral because it also has whales ."
BLAND = "well , it is really nice and it is very good ."


def quiet(**overrides) -> TrainerConfig:
    """A CPU run without a progress bar."""
    return TrainerConfig(**{"device": "cpu", "progress": False, **overrides})


def response_loss(model, tokenizer, examples, max_length: int = 64) -> float:
    """Mean next-token NLL of the response tokens (+ eos) of (prompt, response) examples, as SFT measures it."""
    encoded = [encode_sft_example(tokenizer, p, r, max_length) for p, r in examples]
    return SFTObjective(tokenizer.pad_token_id, encoded, eval_batch_size=32).evaluate(model)["eval/loss"]


def build_tiny_bert(root: pathlib.Path) -> pathlib.Path:
    """A tiny BERT-style encoder classifier and a word-level tokenizer with no eos token, saved at root."""
    words = sorted({w for text in synthetic.corpus_texts(0) for w in text.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    BertForSequenceClassification(config).save_pretrained(root)  # a 2-label head: replaced by a scalar one
    tokenizer.save_pretrained(root)
    return root


def reward_backbone(path, tokenizer) -> torch.nn.Module:
    """The model at `path` as a one-output sequence classifier with a fresh score head, as `rlhf train-rm` starts."""
    model = sequence_classifier(str(path), torch.float32, tokenizer, new_head=True)
    model.config.use_cache = False  # scoring never decodes
    return model.eval()

"""Corpora to token files: `prepare` a text file, folder, Hugging Face dataset or the
embedded default into memory-mapped token arrays with their tokenizer.

>>> data = prepare("path/to/corpus.txt", tokenizer="bpe", vocab_size=4096)  # doctest: +SKIP
>>> data.train.dtype, data.valid.shape, data.tokenizer.decode(data.valid[:20].tolist())  # doctest: +SKIP
"""

from infmoe.data.pipeline import PreparedData, prepare
from infmoe.data.sources import EMBEDDED
from infmoe.data.tokenizer import Tokenizer, load_tokenizer
from infmoe.data.tokens import unigram_loss

__all__ = ["EMBEDDED", "PreparedData", "Tokenizer", "load_tokenizer", "prepare", "unigram_loss"]

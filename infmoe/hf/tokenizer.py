"""Our `Tokenizer` as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json).

Both backends end up as one `tokenizers` byte-level BPE that `AutoTokenizer` loads offline
as a `PreTrainedTokenizerFast` with ``<|endoftext|>`` as bos, eos and unk (as GPT-2's):

- a trained BPE is already a `tokenizers.Tokenizer`: its tokenizer.json is shipped as is;
- tiktoken's GPT-2 encoding is converted: its ranks become the vocabulary (id = rank) and
  the merges are recovered by replaying tiktoken's BPE on each token, so the converted
  tokenizer gives the same ids as tiktoken. Converting needs the encoding itself, i.e.
  tiktoken's cached GPT-2 files.

Reading the files back into our `Tokenizer` is `infmoe.data.load_tokenizer(DIR)` (it reads
tokenizer.json); a converted GPT-2 then comes back as a BPE named "bpe-50257" with the same ids.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from pathlib import Path

import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from infmoe.data.text import EOT
from infmoe.data.tokenizer import BPE_FILE, Tokenizer


def tokenizers_backend(tokenizer: Tokenizer) -> HFTokenizer:
    """`tokenizer` as a `tokenizers.Tokenizer` with the same ids."""
    if tokenizer.is_tiktoken:
        return tiktoken_to_tokenizers(tiktoken.get_encoding(tokenizer.name))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        return HFTokenizer.from_file(str(Path(tmp) / BPE_FILE))


def tiktoken_to_tokenizers(encoding: tiktoken.Encoding) -> HFTokenizer:
    """A `tokenizers` byte-level BPE that encodes exactly as `encoding` does (same ids)."""
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for token_id in range(encoding.n_vocab):
        if encoding.is_special_token(token_id):
            special[encoding.decode([token_id])] = token_id
        else:
            ranks[encoding.decode_single_token_bytes(token_id)] = token_id
    to_unicode = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    # tiktoken merges the adjacent pair of lowest rank first, so the merge that makes a token
    # of rank r is where BPE over its bytes stops when only ranks below r are allowed.
    merges = [(text(left), text(right)) for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
              if len(token) > 1 for left, right in [_last_merge(ranks, token, rank)]]
    backend = HFTokenizer(models.BPE({text(t): r for t, r in ranks.items()}, merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        # tiktoken keeps its split pattern private; it has no public accessor.
        pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(sorted(special, key=special.get))
    return backend


def _last_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two parts that BPE joins last to build `token` (of rank `rank`)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} of rank {rank} is not one merge of lower-ranked tokens")
    return parts[0], parts[1]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (tokenizers' ByteLevel)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, model_max_length: int) -> list[str]:
    """Write `tokenizer` for `AutoTokenizer` into `directory`; returns the file names written."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers_backend(tokenizer),
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # decode must give back the text exactly
    )
    written = [Path(f).name for f in fast.save_pretrained(str(directory))]
    # transformers 5 writes its new class name "TokenizersBackend"; the old name loads in 4.x
    # too and means the same class in 5.x.
    config_file = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return written

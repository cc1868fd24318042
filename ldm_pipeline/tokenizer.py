"""A CLIP-format BPE tokenizer learned from our own training captions.

We train offline from scratch, so we cannot download openai/clip-vit-large-patch14's tokenizer.
`build_tokenizer` returns a standard `transformers.CLIPTokenizer` (same normalizer, word splitter,
"</w>" end-of-word suffix and special tokens as CLIP) whose vocabulary is:

* all 256 byte-level symbols, bare and with "</w>", so any text encodes without unknown tokens;
* one token per caption word (the most frequent `max_words` seen at least `min_frequency` times),
  plus the intermediate tokens its merges produce;
* "<|startoftext|>" and "<|endoftext|>" (eos, pad and unk, as in CLIP) with the two largest ids.

`model_max_length` is the sequence length the text encoder is built with (its position
embeddings): the longest caption's token count including bos and eos, rounded up to a multiple of
8 and capped at CLIP's 77. Short captions thus get a short, cheap encoder instead of 77 positions;
the multiple of 8 leaves a little headroom and keeps tensor shapes kernel friendly. Longer prompts
are cut by the caller (`padding="max_length", truncation=True`, as diffusers' pipelines do).

transformers 5's `save_pretrained` writes only tokenizer.json and tokenizer_config.json; use
`save_tokenizer` to also write CLIP's plain vocab.json and merges.txt.
"""

import math
import os
from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"  # CLIP marks a word's last symbol, so "a" ending a word differs from "a" inside one
CLIP_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to one printable character, as GPT-2 and CLIP do (Radford et al., 2019).

    BPE merges strings, but raw bytes include whitespace and control codes that would be split by
    the pre-tokenizer and be unreadable in vocab.json. The 188 printable Latin-1 bytes stand for
    themselves; the other 68 are shifted, in byte order, to code points 256, 257, ...
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE-encode one byte-level word the way `tokenizers` does: lowest-rank pair first, leftmost on ties."""
    parts = [*word[:-1], word[-1] + END_OF_WORD]
    while len(parts) > 1:
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == math.inf:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def caption_model_max_length(tokenizer: CLIPTokenizer, captions: Iterable[str]) -> int:
    """Longest caption in tokens (bos and eos included), rounded up to a multiple of 8, at most 77."""
    captions = list(captions)
    if not captions:
        raise ValueError("caption_model_max_length needs at least one caption; got an empty list.")
    # verbose=False: the tokenizer may already have a shorter model_max_length; we measure, not truncate.
    longest = max(len(ids) for ids in tokenizer(captions, verbose=False)["input_ids"])
    return min(CLIP_MAX_LENGTH, math.ceil(longest / 8) * 8)


def build_tokenizer(
    captions: Iterable[str], min_frequency: int = 1, max_words: int = 4096, model_max_length: int | None = None
) -> CLIPTokenizer:
    """Learn a CLIP tokenizer in which every frequent caption word is a single token."""
    captions = list(captions)
    if not captions:
        raise ValueError("build_tokenizer needs the training captions to learn words from; got an empty caption list.")
    if min_frequency < 1 or max_words < 0:
        raise ValueError(f"Need min_frequency >= 1 and max_words >= 0; got {min_frequency=} and {max_words=}.")
    if model_max_length is not None and model_max_length < 3:
        raise ValueError(f"model_max_length={model_max_length} leaves no room for a word between bos and eos; "
                         "use >= 3.")

    symbols = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(symbols + [s + END_OF_WORD for s in symbols])}
    specials = {BOS: len(vocab), EOS: len(vocab) + 1}
    # Split captions with CLIP's own normalizer and pre-tokenizer (lowercase, letters/digits/punctuation
    # runs, then byte-level symbols), so our words are exactly the pieces the tokenizer will look up.
    backend = CLIPTokenizer(vocab={**vocab, **specials}).backend_tokenizer
    counts = Counter(
        word
        for caption in captions
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(caption))
    )
    # Sorting ties by the word makes the ids independent of caption order.
    words = sorted((w for w, n in counts.items() if n >= min_frequency), key=lambda w: (-counts[w], w))[:max_words]

    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Join the word's first two current tokens with a merge ranked after all others. It can only
        # fire once every earlier merge has, when earlier words are already one token, so they stay
        # intact, and this word loses at least one token per round. (Plain left-to-right merges per
        # word can break: another word's merge of lower rank may grab the middle of this one.)
        while len(parts := _apply_merges(word, ranks)) > 1:
            ranks[parts[0], parts[1]] = len(merges)
            merges.append((parts[0], parts[1]))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    # Special tokens take the largest ids as in CLIP: CLIPTextModel configs with the legacy
    # eos_token_id=2 pool the text embedding at input_ids.argmax(-1), which must be the eos.
    vocab.update({BOS: len(vocab), EOS: len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)

    split = [w for w in words if len(tokenizer.backend_tokenizer.model.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"Learned merges do not make these words single tokens (a bug here): {split[:10]}")
    tokenizer.model_max_length = model_max_length or caption_model_max_length(tokenizer, captions)
    return tokenizer


def save_tokenizer(tokenizer: CLIPTokenizer, directory: str | os.PathLike) -> None:
    """`save_pretrained` plus CLIP's vocab.json and merges.txt.

    transformers 5 saves only tokenizer.json; the two plain files keep the folder loadable by
    transformers 4's `CLIPTokenizer` (the class diffusers' model_index.json names) and other CLIP tools.
    """
    tokenizer.save_pretrained(directory)
    tokenizer.backend_tokenizer.model.save(str(directory))

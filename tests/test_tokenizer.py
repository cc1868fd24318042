import random

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, CLIPTokenizer

from ldm_pipeline.tokenizer import BOS, EOS, build_tokenizer, bytes_to_unicode, caption_model_max_length, save_tokenizer

CAPTIONS = [
    "a red circle in the top left",
    "a photo of a dog",
    "A  Photo of two dogs.",
    "a cat, 2 dogs!",
    "the dog's ball is at 3 o'clock...",
]
SHAPE_CAPTIONS = [
    f"{'an' if color == 'orange' else 'a'} {color} {shape} in the {position}"
    for color in ["red", "green", "blue", "yellow", "purple", "orange"]
    for shape in ["circle", "square", "triangle"]
    for position in ["top left", "top right", "bottom left", "bottom right", "center"]
]


def words_of(tokenizer, text):
    """The words CLIP's normalizer and pre-tokenizer cut `text` into (byte-level strings)."""
    backend = tokenizer.backend_tokenizer
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]


def assert_no_unknown(tokenizer, ids):
    # unk is the eos id in CLIP, so an unknown symbol would show up as eos before the end.
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_bytes_to_unicode_matches_the_byte_level_alphabet():
    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert mapping[ord("a")] == "a" and mapping[ord(" ")] == "Ġ"  # GPT-2's well-known space symbol


def test_caption_words_are_single_tokens_and_round_trip():
    tokenizer = build_tokenizer(CAPTIONS)
    assert tokenizer.tokenize("a cat, 2 dogs!") == ["a</w>", "cat</w>", ",</w>", "2</w>", "dogs</w>", "!</w>"]
    assert tokenizer.tokenize("o'clock...") == ["o</w>", "'</w>", "clock</w>", "...</w>"]
    for caption in CAPTIONS:
        tokens = tokenizer.tokenize(caption)
        assert len(tokens) == len(words_of(tokenizer, caption)) and all(t.endswith("</w>") for t in tokens)
        ids = tokenizer(caption).input_ids
        assert_no_unknown(tokenizer, ids)
        # CLIP decodes with a space after every word, punctuation included, so compare without spaces.
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == caption.lower().replace(" ", "")
    assert tokenizer.decode(tokenizer("A  Red CIRCLE in the top left").input_ids, skip_special_tokens=True) == (
        "a red circle in the top left"
    )


def test_unseen_text_encodes_byte_level_without_unknown_tokens():
    tokenizer = build_tokenizer(CAPTIONS)
    ids = tokenizer("Zebra über 😀 ñ 123").input_ids
    assert_no_unknown(tokenizer, ids)
    assert len(ids) > 2 + 5  # unseen words fall back to several byte tokens
    # CLIP's splitter makes each digit its own word, hence "1 2 3".
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebra über 😀 ñ 1 2 3"


def test_merges_of_other_words_cannot_split_a_learned_word():
    # Naive left-to-right merges fail here: "bc"'s merge (b, c</w>) outranks (a, b) and splits "abc";
    # "ababa" repeats its own first pair; "aaaa" overlaps itself.
    tokenizer = build_tokenizer(["bc bc bc ab ab abc ababa aaaa"])
    assert tokenizer.tokenize("bc ab abc ababa aaaa") == ["bc</w>", "ab</w>", "abc</w>", "ababa</w>", "aaaa</w>"]


def test_save_and_reload_give_identical_ids(tmp_path):
    tokenizer = build_tokenizer(CAPTIONS)
    save_tokenizer(tokenizer, tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= written
    texts = CAPTIONS + ["Zebra über 😀 ñ 123"]
    expected = tokenizer(texts, padding="max_length", truncation=True).input_ids
    for reloaded in [CLIPTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)]:
        assert isinstance(reloaded, CLIPTokenizer)
        assert reloaded.model_max_length == tokenizer.model_max_length
        assert reloaded.get_vocab() == tokenizer.get_vocab()
        assert reloaded(texts, padding="max_length", truncation=True).input_ids == expected

    # vocab.json + merges.txt alone are a complete CLIP tokenizer (what transformers 4 loads).
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ["vocab.json", "merges.txt"]:
        (plain / name).write_bytes((tmp_path / name).read_bytes())
    assert CLIPTokenizer.from_pretrained(plain)(texts).input_ids == tokenizer(texts).input_ids


def test_model_max_length_rule_padding_and_truncation():
    tokenizer = build_tokenizer(SHAPE_CAPTIONS)
    # Longest caption, "a purple triangle in the bottom right": 7 words + bos + eos = 9 -> 16.
    assert max(len(ids) for ids in tokenizer(SHAPE_CAPTIONS).input_ids) == 9
    assert tokenizer.model_max_length == caption_model_max_length(tokenizer, SHAPE_CAPTIONS) == 16
    assert caption_model_max_length(tokenizer, ["a " * 14]) == 16  # 16 tokens: already a multiple of 8
    assert caption_model_max_length(tokenizer, ["a " * 15]) == 24
    assert caption_model_max_length(tokenizer, ["a " * 200]) == 77  # never longer than CLIP

    batch = tokenizer(["a red circle in the center"], padding="max_length", truncation=True)
    ids, mask = batch.input_ids[0], batch.attention_mask[0]
    assert len(ids) == 16 and sum(mask) == 8
    assert ids[0] == tokenizer.bos_token_id and ids[7] == tokenizer.eos_token_id
    assert tokenizer.pad_token == EOS and ids[8:] == [tokenizer.pad_token_id] * 8
    long_ids = tokenizer("a red circle " * 10, padding="max_length", truncation=True).input_ids
    assert len(long_ids) == 16 and long_ids[-1] == tokenizer.eos_token_id

    assert build_tokenizer(SHAPE_CAPTIONS, model_max_length=32).model_max_length == 32


def test_shape_captions_vocabulary():
    tokenizer = build_tokenizer(SHAPE_CAPTIONS)
    words = {w for caption in SHAPE_CAPTIONS for w in caption.split()}
    assert all(len(tokenizer.tokenize(w)) == 1 for w in words)
    # Special tokens take the two largest ids, as in CLIP (legacy CLIPTextModel pools at argmax id).
    assert (tokenizer.convert_tokens_to_ids(BOS), tokenizer.eos_token_id) == (len(tokenizer) - 2, len(tokenizer) - 1)
    assert 512 + 2 + len(words) <= len(tokenizer) <= 512 + 2 + sum(len(w) for w in words)


def test_min_frequency_and_max_words_limit_the_learned_words():
    tokenizer = build_tokenizer(["a dog", "a dog", "a cat"], min_frequency=2)
    assert tokenizer.tokenize("dog cat") == ["dog</w>", "c", "a", "t</w>"]
    tokenizer = build_tokenizer(["a dog", "a dog", "a cat"], max_words=2)  # "a" and "dog" are most frequent
    assert tokenizer.tokenize("dog cat") == ["dog</w>", "c", "a", "t</w>"]


def test_vocabulary_does_not_depend_on_caption_order():
    shuffled = SHAPE_CAPTIONS + CAPTIONS
    random.Random(0).shuffle(shuffled)
    first, second = build_tokenizer(SHAPE_CAPTIONS + CAPTIONS), build_tokenizer(shuffled)
    assert first.get_vocab() == second.get_vocab()
    assert first(CAPTIONS).input_ids == second(CAPTIONS).input_ids


def test_bad_arguments_fail_with_clear_errors():
    with pytest.raises(ValueError, match="empty caption list"):
        build_tokenizer([])
    with pytest.raises(ValueError, match="empty caption list"):
        build_tokenizer(c for c in [])
    with pytest.raises(ValueError, match="min_frequency"):
        build_tokenizer(CAPTIONS, min_frequency=0)
    with pytest.raises(ValueError, match="model_max_length"):
        build_tokenizer(CAPTIONS, model_max_length=2)

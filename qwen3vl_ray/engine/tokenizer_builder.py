"""A small, deterministic Qwen-style tokenizer for generated checkpoints.

Real Qwen3-VL tokenizers are byte-level BPE with Qwen's pre-tokenizer regex and ~151k entries. No
tokenizer can be downloaded here, so we train one of the same kind (same normalizer, pre-tokenizer
and decoder as ``transformers.Qwen2Tokenizer`` rebuilds on load) on a small built-in corpus. Byte-level
BPE covers every byte, so any text, unicode included, round-trips exactly.

The special tokens follow Qwen's order and sit right after the ``BASE_VOCAB`` learned entries, so
their ids are fixed constants (see ``SPECIAL_TOKEN_IDS``) independent of the corpus.
"""

from __future__ import annotations

import json
import logging
import random

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

#: Learned byte-level BPE entries (256 byte symbols + merges); special tokens start at this id.
BASE_VOCAB = 1024

# Same regex as transformers' Qwen2Tokenizer: on load it rebuilds the pipeline from vocab + merges with
# this exact pre-tokenizer, so training with anything else would tokenize differently after a reload.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (token, special) in Qwen2/Qwen3 order. special=False mirrors the real tokenizer: these are added
# tokens that are never split but are kept by decode(skip_special_tokens=True).
_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

#: token string -> id, fixed for every generated checkpoint.
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: BASE_VOCAB + i for i, (tok, _) in enumerate(_SPECIAL_TOKENS)}

#: Number of entries in the tokenizer (learned + special). The model's vocab_size is padded above it.
TOKENIZER_SIZE = BASE_VOCAB + len(_SPECIAL_TOKENS)

# A compact built-in corpus: common English words plus a few accented / CJK / emoji words, mixed
# into sentences by a seeded RNG. Enough distinct pairs for BASE_VOCAB - 256 merges.
_WORDS = """
the of and to in is a that for it as with was on be by this are from at or an have not which but all
were they their one you has more can there been other would its some two these what about only time
into when than first also new any may after most people over such made well years between world used
where like city many before them state three high war through school image picture photo video frame
color red green blue yellow black white left right top bottom small large cat dog bird car house tree
water river mountain sky cloud sun moon star light dark person man woman child hand face eye text sign
number table chair window door road street building room book paper screen phone computer model token
cache memory store layer vector tensor matrix prefix answer question describe show tell count where
what which whose why how many much very really quite because therefore however although while during
please thank hello world assistant user system response request server client cluster node disk host
device network python code function value return class object string list dict error warning result
example simple complex first second third last next previous before after today yesterday tomorrow
morning evening night week month year hour minute second zero one two three four five six seven eight
nine ten hundred thousand million
""".split()
_EXTRA = "café naïve über straße façade résumé déjà 東京 你好 世界 图片 こんにちは 안녕하세요 привет мир 🙂 👍 🐱".split()
_PUNCT = [".", ",", "?", "!", ":", ";", " -", " (", ")", '"', "'s", "'t", "\n"]


def _corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    rng = random.Random(seed)
    words = _WORDS + [w.capitalize() for w in _WORDS[:120]] + _EXTRA
    out = []
    for _ in range(sentences):
        n = rng.randint(4, 14)
        parts = [rng.choice(words) for _ in range(n)]
        text = " ".join(parts)
        if rng.random() < 0.3:
            text += " " + str(rng.randint(0, 99999))
        out.append(text + rng.choice(_PUNCT))
    return out


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE and append the special tokens; deterministic for a given ``tokenizers``."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        # Special-token ids are constants; a short corpus would shift them, so refuse instead.
        raise RuntimeError(f"BPE training reached {tok.get_vocab_size()} entries, expected {BASE_VOCAB}")
    added = tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in _SPECIAL_TOKENS])
    assert added == len(_SPECIAL_TOKENS)
    for t, i in SPECIAL_TOKEN_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    return tok


def build_hf_tokenizer(chat_template: str, model_max_length: int = 262144):
    """The trained tokenizer wrapped as ``transformers.Qwen2Tokenizer`` (what real checkpoints name)."""
    from transformers import Qwen2Tokenizer

    tok = build_tokenizer()
    spec = json.loads(tok.to_str())
    vocab = dict(spec["model"]["vocab"])
    vocab.update(SPECIAL_TOKEN_IDS)  # specials live in the BPE vocab too, as in Qwen's tokenizer.json
    merges = [tuple(m) for m in spec["model"]["merges"]]
    hf = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",  # Instruct checkpoints end a turn with <|im_end|>
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        errors="replace",
        split_special_tokens=False,
    )
    hf.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in _SPECIAL_TOKENS if not s])
    extra = [t for t, s in _SPECIAL_TOKENS if s and t not in ("<|endoftext|>", "<|im_end|>")]
    hf.add_special_tokens({"additional_special_tokens": extra})
    hf.chat_template = chat_template
    for t, i in SPECIAL_TOKEN_IDS.items():
        got = hf.convert_tokens_to_ids(t)
        if got != i:
            raise RuntimeError(f"special token {t!r} got id {got}, expected {i}")
    return hf

"""Incremental detokenization against decoding the whole output (the oracle), token by token,
for the demo tokenizer and for a byte-level BPE whose tokens split multi-byte characters."""

from __future__ import annotations

import random

import pytest

from afd_compile.engine.detokenizer import IncrementalDetokenizer
from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.engine.sequence import Sequence
from afd_compile.model.loader import load_tokenizer

TEXT = ["naïve café 東京 ☕ 🚀 emoji 👩‍👩‍👧 mixed ASCII text, numbers 12345 and ünïcödé", "1 3 5 7 9 11 13",
        "def f(x):\n    return x ** 2  # ∑ ∫"] * 20


def byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(params=["demo", "byte-level-bpe"])
def tokenizer(request, shipped_model):
    return load_tokenizer(shipped_model) if request.param == "demo" else byte_level_bpe()


def test_incremental_text_equals_whole_decode(tokenizer, request):
    samples = [tokenizer.encode(t) for t in TEXT[:3]]
    if "demo" in request.node.name:  # any ids, specials too (random bytes would be invalid UTF-8)
        rng = random.Random(0)
        samples += [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(5)]
    for ids in samples:
        seq = Sequence([1], SamplingParams(), detokenizer=IncrementalDetokenizer(tokenizer))
        for i, token in enumerate(ids):
            seq.output_token_ids.append(token)
            whole = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
            if whole.endswith("\ufffd"):  # a character split across tokens waits until complete
                assert whole.startswith(seq.output_text)
            else:
                assert seq.output_text == whole
        # Decoded on demand once at the end (an offline run) gives the same text.
        once = Sequence([1], SamplingParams(), output_token_ids=list(ids), detokenizer=IncrementalDetokenizer(tokenizer))
        assert once.output_text == seq.output_text

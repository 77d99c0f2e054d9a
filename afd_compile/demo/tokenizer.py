"""The demo model's tokenizer: one token per number 0..999 plus chat markers, built with
`tokenizers` and saved so `transformers.AutoTokenizer` loads it (chat template included)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from afd_compile.demo.tasks import MAX_NUMBER

SPECIAL = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>", "unk": "<|unk|>"}
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|> {{ message['content'] }} {{ eos_token }} "
    "{% elif message['role'] == 'system' %}<|system|> {{ message['content'] }} "
    "{% else %}<|user|> {{ message['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate([*SPECIAL.values(), *ROLES])}
    for n in range(MAX_NUMBER + 1):
        vocab[str(n)] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A raw-text prompt starts with bos as in training (Llama's tokenizers do the same); the chat
    # template writes its own bos and is encoded without special tokens.
    core.post_processor = processors.TemplateProcessing(single=f"{SPECIAL['bos']} $A",
                                                        special_tokens=[(SPECIAL["bos"], vocab[SPECIAL["bos"]])])
    # WordLevel has no spacing information: join words with one space when decoding.
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def save_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(out_dir)
    return tok

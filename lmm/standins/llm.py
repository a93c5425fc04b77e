"""Tiny random-init stand-ins of the LLM families lmm supports, each with a tokenizer of its kind.

``build_llm(family, out_dir)`` writes a 2-layer model of the family's real transformers class
(``LlamaForCausalLM``, ``PhiForCausalLM``, ...) with ``save_pretrained``, plus a tokenizer that
is built locally with the ``tokenizers`` library the way that family's real tokenizer works:

- ``llama`` (TinyLlama), ``gemma``: SentencePiece-style BPE over ``▁``-marked words with byte
  fallback; Llama prepends ``▁`` to the text and has ``<unk>``/``<s>``/``</s>`` and no pad
  token, Gemma adds no prefix space and has ``<pad>``/``<eos>``/``<bos>``/``<unk>``/``<mask>``
  plus ``<start_of_turn>``/``<end_of_turn>`` and a chat template.
- ``phi`` (Phi-2), ``stablelm`` (StableLM-2): GPT-2 byte-level BPE where ``<|endoftext|>`` is
  bos, eos and unk at once, and there is no pad token.
- ``qwen2`` (Qwen2 / Qwen2.5 instruct): byte-level BPE with Qwen's pre-tokenizer regex, no bos,
  eos ``<|im_end|>``, pad ``<|endoftext|>`` and a ChatML chat template.

The saved ``tokenizer_config.json`` names the family's tokenizer class, so ``AutoTokenizer``
loads it through the same class a hub checkpoint of that family uses. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmm.errors import ConfigError

# Which kind of BPE a family's tokenizer is.
TokenizerKind = Literal["sentencepiece", "gpt2", "qwen2"]

# Qwen2's pre-tokenizer: like GPT-4's, digits one by one, newlines kept apart from words.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML as Qwen2-Instruct writes it: a default system turn when the conversation has none.
CHATML_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Gemma's format: bos first, roles user/model, contents trimmed, no system role.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class LLMFamily:
    """One supported LLM family: what its real checkpoints look like and how lmm uses them.

    Attributes:
        name: Family key (``FAMILIES``).
        examples: Hub checkpoints of this family (for documentation; never downloaded).
        model_class: transformers causal-LM class of the stand-in.
        tokenizer_class: Tokenizer class named in ``tokenizer_config.json`` (as on the hub).
        tokenizer_kind: Which BPE the stand-in tokenizer is.
        specials: Special tokens in vocabulary order (they get the first ids, as in the
            SentencePiece families; byte-level families get them after the learned vocabulary).
        bos, eos, unk, pad: The named special tokens (None: the real tokenizer has none).
        add_bos: Whether the tokenizer puts bos in front of every text.
        chat_template: The tokenizer's own chat template (None: it has none).
        template: Recommended ``data.template`` for chat fine-tuning.
        tie_word_embeddings: LM head shares the input embedding matrix (Gemma, small Qwen2).
        spare_rows: The checkpoint's embedding matrix has unused rows beyond the tokenizer
            (Phi-2, StableLM-2, Qwen2), so adding ``<image>`` needs no resize; Llama and Gemma
            have exactly one row per token and are resized.
        config: Architecture arguments of the stand-in (tiny sizes, family-specific switches).
    """

    name: str
    examples: tuple[str, ...]
    model_class: str
    tokenizer_class: str
    tokenizer_kind: TokenizerKind
    specials: tuple[str, ...]
    eos: str
    bos: str | None
    unk: str | None
    pad: str | None
    add_bos: bool
    chat_template: str | None
    template: str
    tie_word_embeddings: bool
    spare_rows: bool
    config: dict[str, Any] = field(default_factory=dict)


_SIZES = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
)

FAMILIES: dict[str, LLMFamily] = {
    "llama": LLMFamily(
        name="llama",
        examples=(
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
            "lmsys/vicuna-7b-v1.5",  # LLaVA-1.5
            "lmsys/vicuna-13b-v1.5",
            "lmsys/vicuna-7b-v1.3",  # LLaVA (v1)
        ),
        model_class="LlamaForCausalLM",
        tokenizer_class="LlamaTokenizer",
        tokenizer_kind="sentencepiece",
        specials=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        unk="<unk>",
        pad=None,
        add_bos=True,
        chat_template=None,
        template="vicuna",
        tie_word_embeddings=False,
        spare_rows=False,
        config=dict(_SIZES, intermediate_size=128, num_key_value_heads=2),
    ),
    "phi": LLMFamily(
        name="phi",
        examples=("microsoft/phi-2",),
        model_class="PhiForCausalLM",
        tokenizer_class="CodeGenTokenizer",
        tokenizer_kind="gpt2",
        specials=("<|endoftext|>",),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        unk="<|endoftext|>",
        pad=None,
        add_bos=False,
        chat_template=None,
        template="phi",
        tie_word_embeddings=False,
        spare_rows=True,
        config=dict(_SIZES, intermediate_size=256, partial_rotary_factor=0.5),
    ),
    "stablelm": LLMFamily(
        name="stablelm",
        examples=("stabilityai/stablelm-2-1_6b", "stabilityai/stablelm-2-zephyr-1_6b"),
        model_class="StableLmForCausalLM",
        tokenizer_class="GPT2Tokenizer",
        tokenizer_kind="gpt2",
        specials=("<|endoftext|>",),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        unk="<|endoftext|>",
        pad=None,
        add_bos=False,
        chat_template=None,
        # TinyLLaVA trains StableLM-2 with its phi template: same end-of-turn token.
        template="phi",
        tie_word_embeddings=False,
        spare_rows=True,
        config=dict(
            _SIZES,
            intermediate_size=128,
            num_key_value_heads=4,
            partial_rotary_factor=0.25,
            use_qkv_bias=True,
        ),
    ),
    "qwen2": LLMFamily(
        name="qwen2",
        examples=(
            "Qwen/Qwen2-0.5B-Instruct",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "Qwen/Qwen2.5-1.5B-Instruct",
        ),
        model_class="Qwen2ForCausalLM",
        tokenizer_class="Qwen2Tokenizer",
        tokenizer_kind="qwen2",
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        unk=None,
        pad="<|endoftext|>",
        add_bos=False,
        chat_template=CHATML_CHAT_TEMPLATE,
        template="chatml",
        tie_word_embeddings=True,
        spare_rows=True,
        config=dict(_SIZES, intermediate_size=128, num_key_value_heads=2),
    ),
    "gemma": LLMFamily(
        name="gemma",
        examples=("google/gemma-2b", "google/gemma-2b-it"),
        model_class="GemmaForCausalLM",
        tokenizer_class="GemmaTokenizer",
        tokenizer_kind="sentencepiece",
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        unk="<unk>",
        pad="<pad>",
        add_bos=True,
        chat_template=GEMMA_CHAT_TEMPLATE,
        template="gemma",
        tie_word_embeddings=True,
        spare_rows=False,
        config=dict(_SIZES, intermediate_size=128, num_key_value_heads=1, head_dim=16),
    ),
}


def family_of(name_or_path: str) -> str:
    """The family whose ``examples`` list this hub name (exact match), e.g. for picking the
    stand-in of a recipe's LLM."""
    for family in FAMILIES.values():
        if name_or_path in family.examples:
            return family.name
    known = ", ".join(e for f in FAMILIES.values() for e in f.examples)
    raise ConfigError(f"no stand-in family lists {name_or_path!r}; known: {known}")


# A small English corpus: the conversation templates' own words, everyday sentences and the
# shapes world's vocabulary, so that multi-turn conversations tokenize into real words.
_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the picture? ASSISTANT: A dog is sitting on the grass.",
    "USER: Is there a red circle in the image? ASSISTANT: Yes, there is a red circle.",
    "USER: How many shapes are there? ASSISTANT: There are three shapes.",
    "system\nYou are a helpful assistant.\nuser\nWhat color is the square?\nassistant\nThe square is blue.",
    "user\nDescribe the image.\nmodel\nA small green triangle at the top left.",
    "The quick brown fox jumps over the lazy dog.",
    "A man is riding a bicycle down a quiet street in the morning.",
    "Two children are playing with a ball in the park near the river.",
    "The kitchen has a wooden table, four chairs and a white refrigerator.",
    "What is the man holding in his hand? He is holding an umbrella.",
    "Where is the cat? The cat is sleeping on the sofa next to the window.",
    "Is the sky cloudy or clear? The sky is clear and bright blue.",
    "What time of day is it? It looks like late afternoon.",
    "Please answer the question with a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "There is a train at the station and people are waiting on the platform.",
    "A plate of food with rice, vegetables and a piece of chicken.",
    "The street sign says stop, and a red car is parked beside it.",
    "Can you read the text on the sign? It says open every day.",
    "Describe the image in detail. The image shows a busy market with many colorful fruits.",
    "Thank you for the help! You are welcome, let me know if you have more questions.",
    "Yes, it is. No, it is not. I am not sure. Maybe.",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 2024",
)


def standin_corpus() -> list[str]:
    """Training text of the stand-in tokenizers (the built-in corpus and the shapes world)."""
    from lmm.worlds.shapes.corpus import world_corpus

    return list(_CORPUS) * 4 + world_corpus()


@dataclass(frozen=True)
class StandinSpec:
    """What a stand-in build depends on; a directory built from another spec is rebuilt.

    Args:
        family: Key of ``FAMILIES``.
        bpe_vocab_size: Learned BPE vocabulary size (before byte and special tokens).
        seed: Seed of the random initialisation.
    """

    family: str
    bpe_vocab_size: int = 1000
    seed: int = 0


def _train_bpe(family: LLMFamily, corpus: list[str], vocab_size: int):
    """Learned BPE vocabulary and merges for ``family``'s kind of tokenizer."""
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    alphabet: list[str] = []
    if family.tokenizer_kind == "sentencepiece":
        # Words carry a leading "▁"; newlines never merge with letters.
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", "isolated"),
                pre_tokenizers.Metaspace(prepend_scheme="never", split=True),
            ]
        )
    elif family.tokenizer_kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False
    )
    # Lines that open with a word stand for text that starts mid-sentence too: both forms of a
    # word get learned, as in a large corpus.
    texts = corpus + [" " + line for line in corpus]
    tok.train_from_iterator(texts, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = sorted(state["vocab"], key=state["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return vocab, merges


def build_backend(family: LLMFamily, corpus: list[str], vocab_size: int):
    """The ``tokenizers.Tokenizer`` of ``family``'s kind, trained on ``corpus``."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    learned, merges = _train_bpe(family, corpus, vocab_size)
    if family.tokenizer_kind == "sentencepiece":
        # SentencePiece layout: special tokens, then the 256 byte-fallback tokens, then pieces.
        pieces = list(family.specials) + [f"<0x{b:02X}>" for b in range(256)]
        taken = set(pieces)
        pieces += [p for p in learned if p not in taken]
        vocab = {p: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab, merges=merges, unk_token=family.unk, fuse_unk=True, byte_fallback=True
        )
        tok = Tokenizer(model)
        if family.name == "llama":
            # Llama (non-legacy): "▁" in front of the text, spaces become "▁".
            tok.pre_tokenizer = pre_tokenizers.Metaspace(
                replacement="▁", prepend_scheme="first", split=False
            )
            steps = [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        else:
            # Gemma: no prefix space; the normalizer turns spaces into "▁".
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps)
    else:
        vocab = {p: i for i, p in enumerate(learned)}
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        if family.tokenizer_kind == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), "isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        tok.decoder = decoders.ByteLevel()
    # Special tokens are matched in raw text before normalization (already-present ones keep their ids).
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in family.specials])
    if family.add_bos:
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos}:0 $A:0",
            pair=f"{family.bos}:0 $A:0 {family.bos}:1 $B:1",
            special_tokens=[(family.bos, bos_id)],
        )
    elif family.tokenizer_kind != "sentencepiece":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_family_tokenizer(
    family: LLMFamily, corpus: list[str] | None = None, vocab_size: int = StandinSpec.bpe_vocab_size
):
    """A transformers fast tokenizer of ``family``'s kind (not yet saved)."""
    from transformers import PreTrainedTokenizerFast

    backend = build_backend(family, standin_corpus() if corpus is None else corpus, vocab_size)
    named = {
        "bos_token": family.bos,
        "eos_token": family.eos,
        "unk_token": family.unk,
        "pad_token": family.pad,
    }
    if family.name == "gemma":
        named["mask_token"] = "<mask>"
    extra = [s for s in family.specials if s not in named.values()]
    kwargs: dict[str, Any] = dict(
        tokenizer_object=backend,
        additional_special_tokens=extra,
        add_bos_token=family.add_bos,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **named,
    )
    if family.tokenizer_kind == "sentencepiece":
        kwargs.update(legacy=False, add_prefix_space=family.name == "llama")
    else:
        kwargs.update(add_prefix_space=False)
    if family.chat_template is not None:
        kwargs["chat_template"] = family.chat_template
    return PreTrainedTokenizerFast(**kwargs)


def _model(family: LLMFamily, vocab_rows: int, tokenizer) -> torch.nn.Module:
    import transformers

    model_cls = getattr(transformers, family.model_class)
    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(tok) if tok is not None else None
        for name, tok in (("bos", family.bos), ("eos", family.eos))
    }
    if family.name == "gemma":
        ids["pad_token_id"] = tokenizer.convert_tokens_to_ids(
            family.pad
        )  # Gemma's config names its pad
    cfg = model_cls.config_class(
        vocab_size=vocab_rows,
        tie_word_embeddings=family.tie_word_embeddings,
        **family.config,
        **ids,
    )
    return model_cls(cfg)


def build_llm(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-init model of ``family`` and its tokenizer to ``out_dir``; returns
    ``out_dir``. Load it with lmm's ``load_tokenizer`` / ``load_language_model`` (or any
    ``from_pretrained``) exactly as a hub checkpoint of that family.

    Deterministic for a given ``seed``; a directory already holding the same build is kept.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    fam = FAMILIES[family]
    spec = StandinSpec(family=family, seed=seed)
    out = Path(out_dir)
    record = out / "standin.json"
    if (
        record.exists()
        and json.loads(record.read_text()) == asdict(spec)
        and (out / "config.json").exists()
    ):
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_family_tokenizer(fam, vocab_size=spec.bpe_vocab_size)
    n = len(tokenizer)
    # Llama/Gemma: one row per token; the others: a multiple of 64 with unused rows to spare.
    rows = -(-(n + 64) // 64) * 64 if fam.spare_rows else n
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(spec.seed)
        model = _model(fam, rows, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Name the family's tokenizer class, as the hub checkpoints do, so AutoTokenizer goes
    # through the same class for the stand-in as for the real model.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = fam.tokenizer_class
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
    record.write_text(json.dumps(asdict(spec)))
    return out

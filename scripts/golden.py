#!/usr/bin/env python3
"""Regenerates the fallback engine's golden vectors with sentence-transformers.

The engine must give the same vectors as the model served remotely, so the
reference is sentence-transformers itself (PyTorch, CPU). It runs in its own
venv, kept out of scripts/setup.sh because torch is large and only this
script needs it:

    python3 -m venv .venv-golden
    .venv-golden/bin/pip install sentence-transformers
    .venv-golden/bin/python scripts/golden.py

Writes proxy/fallback/tests/golden.json: each input with its token count
(after truncation) and its 384-float vector. The model comes from
models/all-MiniLM-L6-v2 (scripts/setup.sh) or INFERMESH_MODEL_DIR.
"""
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = pathlib.Path(os.environ.get("INFERMESH_MODEL_DIR", ROOT / "models" / "all-MiniLM-L6-v2"))
OUT = ROOT / "proxy" / "fallback" / "tests" / "golden.json"

LOREM = (
    "The quick brown fox jumps over the lazy dog while the proxy keeps serving "
    "embeddings from its own compute path, because every remote backend is down. "
)

INPUTS = [
    # one word, in several cases
    "hello",
    "Hello",
    "HELLO",
    "a",
    "I",
    "antidisestablishmentarianism",
    "supercalifragilisticexpialidocious",
    "0",
    "42",
    "3.14159",
    # short sentences
    "The cat sat on the mat.",
    "A man is playing a guitar.",
    "How do I reset my password?",
    "Service meshes route model traffic between pods.",
    "Embeddings map text to vectors.",
    "I love machine learning!",
    "What's the weather like in Paris today?",
    "rust and wgpu compute shaders",
    "Kubernetes sidecar injection webhook",
    "This is a test of the emergency broadcast system.",
    # mixed case and repeated whitespace
    "MiXeD CaSe TeXt WiTh StRaNgE cApItAlIzAtIoN",
    "camelCaseIdentifier and snake_case_identifier",
    "  leading and trailing spaces  ",
    "many     spaces     between     words",
    "tabs\tand\nnewlines\r\nmixed in",
    "\n\n\nonly newlines around\n\n",
    # punctuation and symbols
    "Hello, world! How are you? I'm fine; thanks: really...",
    "!!!???...,,,;;;",
    "e-mail: someone@example.com, url: https://example.com/a?b=c&d=e#f",
    "(parentheses) [brackets] {braces} <angles>",
    "\"double quotes\" and 'single quotes' and `backticks`",
    "price: $19.99 (20% off) - was €24,99",
    "C++ && Python || Rust -> fn main() { println!(\"hi\"); }",
    "2026-11-23T16:00:00Z",
    # accents and other Latin-script text
    "café crème brûlée",
    "naïve résumé façade",
    "Über Größe und Maß",
    "El niño comió jalapeños en la mañana",
    "São Paulo é uma cidade enorme",
    "Ångström, Øresund, Æsir",
    # other scripts
    "你好，世界",
    "机器学习是人工智能的一个分支。",
    "東京は日本の首都です",
    "한국어 문장입니다",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε",
    "ภาษาไทย",
    # emoji
    "I love pizza 🍕🍕🍕",
    "🚀",
    "👍🏽 thumbs up with skin tone",
    "family: 👨‍👩‍👧‍👦 flag: 🇫🇷",
    "emoji😀inside😀words",
    # control and unusual characters
    "zero\u200bwidth\u200bspace",
    "soft\u00adhyphen",
    "tab\u0009separated\u0009values",
    # long texts: beyond 128 and beyond 256 tokens (truncated)
    LOREM * 3,
    LOREM * 6,
    LOREM * 20,
    " ".join(f"word{i}" for i in range(400)),
    "x " * 300,
]


def main() -> int:
    from sentence_transformers import SentenceTransformer

    if not (MODEL / "model.safetensors").is_file():
        print(f"no model at {MODEL}: run scripts/setup.sh", file=sys.stderr)
        return 1
    model = SentenceTransformer(str(MODEL), device="cpu")
    assert model.max_seq_length == 256, model.max_seq_length
    vectors = model.encode(INPUTS, batch_size=16, convert_to_numpy=True, normalize_embeddings=False)
    tokens = [len(model.tokenizer(text, truncation=True, max_length=model.max_seq_length)["input_ids"]) for text in INPUTS]
    cases = [
        {"input": text, "tokens": n, "vector": [float(v) for v in vec]}
        for text, n, vec in zip(INPUTS, tokens, vectors)
    ]
    OUT.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "cases": cases}, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} vectors to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

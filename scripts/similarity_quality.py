"""Quality cost of similarity-guided selection and of sparse_prefill, on the held-out prompts of the built corpus.

For each held-out prompt (chat template applied), the dense model's greedy 24-token continuation is the
reference; each method then scores that continuation by teacher forcing (``SparseLM.score_ids``):
mean log-prob of the reference tokens and top-1 agreement with them. Methods: dense, the artifact's
static hot set, stability-guided, similarity-guided (dense prefill) and similarity-guided with
``sparse_prefill=True``. Prompts outside every cluster radius fall back to stability on the similarity rows;
the "assigned" columns keep only prompts that got a cluster.

    python scripts/similarity_quality.py [--artifact artifacts/smollm2-135m/coreneurons.zarr] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from coreinfer.pipeline.io import read_corpus  # noqa: E402
from coreinfer.runtime import SparseLM  # noqa: E402
from coreinfer.runtime.session import CoreSetSession  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", default="artifacts/smollm2-135m/coreneurons.zarr")
    ap.add_argument("--corpus", default="artifacts/work/corpus.parquet")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", default=None, help="write per-prompt results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = SparseLM.from_pretrained(args.model, artifact=args.artifact)
    held = [r for r in read_corpus(args.corpus).to_pylist() if r["split"] == "heldout"]
    layers = lm.resolve_layers(None)
    rows = []
    for r in held:
        p = r["text"]
        ref = lm.generate(p, method="dense", max_new_tokens=args.new_tokens, chat=True)
        cont, ids = ref.token_ids, lm.encode(p, chat=True)
        res = {"id": r["id"], "task": r["task"]}

        def record(name, s):
            res[name] = {"logprob": float(s.token_logprobs.mean()), "used": s.stats.method_used,
                         "top1": float(np.mean([g == c for g, c in zip(s.greedy_ids, cont)])), "cluster": s.stats.cluster}

        hot = CoreSetSession(layers, None, core_sets={i: lm.artifact.hot_set(i) for i in layers})
        record("static-hot", lm.score_ids(ids, cont, "dense", 0.4, 0.4, layers, session=hot, method_used="static-hot"))
        for name, method, sp in [("dense", "dense", False), ("stability", "stability", False),
                                 ("similarity", "similarity", False), ("similarity+sparse_prefill", "similarity", True)]:
            record(name, lm.score_ids(ids, cont, method, 0.4, 0.4, layers, sparse_prefill=sp, prompt=p))
        rows.append(res)
    assigned = [r for r in rows if r["similarity"]["used"] == "similarity"]
    print(f"{len(rows)} held-out prompts, {len(assigned)} inside a cluster radius; layers {layers.start}:{layers.stop}")
    print(f"{'method':28s} {'logprob(all)':>12s} {'top1(all)':>9s} {'logprob(assigned)':>17s} {'top1(assigned)':>14s}")
    for k in ["dense", "static-hot", "stability", "similarity", "similarity+sparse_prefill"]:
        def m(rs, f):
            return float(np.mean([x[k][f] for x in rs])) if rs else float("nan")
        print(f"{k:28s} {m(rows, 'logprob'):12.3f} {m(rows, 'top1'):9.3f} {m(assigned, 'logprob'):17.3f} {m(assigned, 'top1'):14.3f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

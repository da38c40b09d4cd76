"""Write the synthetic world as the public releases are published, then prepare it like real data.

Because the synthetic set goes through ``medsight data prepare`` exactly as a real release does,
every tiny run exercises the real-data path. The whole tree is built under a temp name and
swapped in at the end, so a crash never leaves a half-written dataset behind.

Layout under ``out_dir``::

    raw/biomedparse/<sub-dataset>/...     the BiomedParse release layout (synthetic_release.py)
    raw/pubmedvision/...                  the PubMedVision release layout
    biomedparse/{train,val,test}.jsonl    the prepared index (val carved out of train)
    pubmedvision/{alignment,instruct}_{train,val}.jsonl   the prepared conversation sets
    reports/                              what prepare skipped and why
    vqa/test.json                         LLaVA-Med VQA-RAD/SLAKE test style (test images only)
    corpus.txt                            release-train text, for the tokenizer
    taxonomy.json                         the label space (written by prepare)
    manifest.json                         counts, seeds, config hash
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from medsight.config.schema import DataConfig
from medsight.data.prepare.biomedparse import BiomedParseOptions, prepare_biomedparse
from medsight.data.prepare.pubmedvision import PubMedVisionOptions, prepare_pubmedvision
from medsight.data.synthetic_images import render_scene
from medsight.data.synthetic_release import BIOMEDPARSE_DIR, PUBMEDVISION_DIR, ReleaseWriter, write_pubmedvision
from medsight.data.synthetic_text import ALIGNMENT_PROMPTS, describe_scene
from medsight.data.synthetic_world import SYNTHETIC_MODALITIES
from medsight.data.taxonomy import Taxonomy
from medsight.data.taxonomy_template import TaxonomyTemplate
from medsight.io_utils import atomic_directory

# Render streams: the release's train split holds the train and val streams (prepare carves val
# back out of it, as it does for a real release), its test split the test stream.
SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 2


def split_seed(seed: int, split: str) -> tuple[int, int]:
    """Seed words of a split; a SeedSequence of distinct words gives independent streams."""
    return (seed, SPLITS.index(split) + 1)


def split_plan(count: int, rng: np.random.Generator) -> list[tuple[int, bool]]:
    """(modality index, has lesion) per image: modalities round-robin, and within every
    modality half the images carry a lesion, so presence is balanced per modality too."""
    modalities = rng.permutation(np.arange(count) % len(SYNTHETIC_MODALITIES))
    lesion = np.zeros(count, dtype=bool)
    for modality in range(len(SYNTHETIC_MODALITIES)):
        members = np.flatnonzero(modalities == modality)
        flags = (np.arange(len(members)) + int(rng.integers(2))) % 2 == 0
        lesion[members] = rng.permutation(flags)
    return [(int(m), bool(flag)) for m, flag in zip(modalities, lesion)]


# The DataConfig fields the generator uses (synth-data's config view in the registry). Others,
# such as data.taxonomy (where readers find a label space; the generator always writes the
# synthetic one) or data.too_many_masks (a reader policy), leave existing datasets' hash alone.
GENERATION_FIELDS = ("source", "image_size", "train_images", "val_images", "test_images", "seed")


def config_sha256(config: DataConfig) -> str:
    fields = {k: getattr(config, k) for k in GENERATION_FIELDS}
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _render(writer: ReleaseWriter, split: str, first_index: int, count: int, config: DataConfig) -> list[int]:
    rng = np.random.default_rng(np.random.SeedSequence(split_seed(config.seed, split)))
    for offset, (modality_id, has_lesion) in enumerate(split_plan(count, rng)):
        scene = render_scene(SYNTHETIC_MODALITIES[modality_id], config.image_size, rng, has_lesion)
        text = describe_scene(scene, rng)
        prompt = ALIGNMENT_PROMPTS[int(rng.integers(len(ALIGNMENT_PROMPTS)))]
        writer.add(first_index + offset, scene, text, prompt)
    return list(split_seed(config.seed, split))


def _dump(path: Path, data: Any, indent: int | None = None) -> None:
    # Plain write: the whole tree is already under a temp name until it is swapped in.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def generate_dataset(out_dir: Path, config: DataConfig) -> dict:
    """Render the release (train = train + val streams, test), prepare it, swap it in atomically.

    Returns the manifest (also written to ``manifest.json``). An existing ``out_dir`` is
    replaced only once the new tree is complete.
    """
    counts = {"train": config.train_images, "val": config.val_images, "test": config.test_images}
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"data.{split}_images must be >= 0, got {count}")
    if config.image_size < 32:
        raise ValueError(f"data.image_size must be >= 32 to hold lesions, got {config.image_size}")
    taxonomy = Taxonomy.synthetic()
    with atomic_directory(Path(out_dir)) as root:
        train, test = ReleaseWriter(root, "train"), ReleaseWriter(root, "test")
        seeds = [_render(train, "train", 0, counts["train"], config),
                 _render(train, "val", counts["train"], counts["val"], config)]
        test_seeds = [_render(test, "test", counts["train"] + counts["val"], counts["test"], config)]
        train.finish()
        test.finish()
        write_pubmedvision(root, train)
        _dump(root / "vqa" / "test.json", test.vqa)
        (root / "corpus.txt").write_text("\n".join(train.corpus) + "\n")
        val_fraction = counts["val"] / max(1, counts["train"] + counts["val"])
        prepared = prepare_biomedparse(
            root / BIOMEDPARSE_DIR, root,
            BiomedParseOptions(val_fraction=val_fraction, seed=config.seed, workers=1, max_bad_fraction=0.0),
            template=TaxonomyTemplate.from_taxonomy(taxonomy), progress=False,
        )
        conversations = prepare_pubmedvision(
            root / PUBMEDVISION_DIR, root,
            # Each file has one row whose image is missing (the real release has ~9): reported, not fatal,
            # however few images a test asks for.
            PubMedVisionOptions(val_fraction=val_fraction, instruct_samples=10**9, seed=config.seed, max_bad_fraction=0.5),
            progress=False,
        )
        manifest = {
            "format_version": FORMAT_VERSION,
            "generator": "medsight.data.synthetic",
            "seed": config.seed,
            "image_size": config.image_size,
            "config_sha256": config_sha256(config),
            "modalities": list(taxonomy.modalities),
            "region_classes": list(taxonomy.region_classes),
            "release": {"train": train.summary(seeds), "test": test.summary(test_seeds)},
            "prepared": {"biomedparse": dict(prepared.images), "pubmedvision": dict(conversations.written)},
        }
        _dump(root / "manifest.json", manifest, indent=2)
    return manifest

"""Run under torchrun by tests/test_distributed.py: what each rank reads, and what rank 0 gathers.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_probe.py MODE DATA OUT

samples: the real stage loaders (stage 1-2 images, LLM-stage conversations) for two epochs and
         a resumed epoch; each rank writes the sample keys it read to OUT/<rank>.json.
eval:    evaluate_benchmark with the fake model over DATA's synthetic MeCoVQA-G; rank 0 writes
         the gathered per-sample results to OUT/0.json.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def samples(data: Path, out: Path) -> None:
    from medsight.config import apply_overrides, get_preset
    from medsight.data.conversation_dataset import collate_conversations
    from medsight.data.taxonomy import resolve_taxonomy
    from medsight.data.tokenizer import load_tokenizer
    from medsight.model.bundle import find_dir
    from medsight.stages.language_training import load_conversations, make_language_data
    from medsight.stages.segmentation_data import load_split, train_loader
    from medsight.train import distributed
    from medsight.train.data import EpochBatches, ResumableSampler, make_loader
    from distributed_fixtures import MINI

    config = apply_overrides(get_preset("tiny"), MINI)
    taxonomy = resolve_taxonomy(data, "")
    split = load_split(data, "train", 32, 16, taxonomy)
    images = EpochBatches(train_loader(split, 3, seed=5, num_workers=1))
    read: dict[str, list] = {}
    for epoch in (0, 1):
        read[f"images-epoch{epoch}"] = [key for batch in images(epoch, 0) for key in batch["keys"]]
    read["images-epoch1-from-batch1"] = [key for batch in images(1, 1) for key in batch["keys"]]

    base = data.parent / "base"
    tokenizer = load_tokenizer(find_dir({"base": base}, "tokenizer"))
    captions = load_conversations(data / "pubmedvision" / "alignment_train.jsonl", data)

    from medsight.model.region_vocabulary import RegionVocabulary

    class Stub:  # the dataset needs only the visual token count and the region vocabulary
        num_visual_tokens = 4
        vocabulary = RegionVocabulary.empty()

    language = make_language_data(config, Stub(), tokenizer, captions, captions[:1], taxonomy)
    loader = make_loader(language.train, 2, ResumableSampler(language.train, seed=5),
                         partial(collate_conversations, pad_id=language.pad_id))
    read["conversations-epoch0"] = [cid for batch in EpochBatches(loader)(0, 0) for cid in batch["ids"]]
    (out / f"{distributed.rank()}.json").write_text(json.dumps(read))


def evaluation(data: Path, out: Path) -> None:
    from eval_fakes import FakeModel

    from medsight.data.taxonomy import Taxonomy
    from medsight.eval.benchmarks.manifest import load_manifest
    from medsight.eval.runner import GenerationSettings, evaluate_benchmark
    from medsight.eval.synthetic_benchmarks import write_synthetic_benchmarks
    from medsight.train import distributed

    manifest = write_synthetic_benchmarks(data, out / "bench", Taxonomy.synthetic()) if distributed.is_main() else None
    manifest = Path(distributed.broadcast_from_main(str(manifest)))
    benchmark = {d.name: d for d in load_manifest(manifest)}["mecovqa_g"]
    model = FakeModel()
    result = evaluate_benchmark(model, benchmark, GenerationSettings(batch_size=3), keep_examples=2, progress=False)
    (out / f"calls-{distributed.rank()}.json").write_text(json.dumps(model.calls))
    if distributed.is_main():
        (out / "0.json").write_text(json.dumps({
            "ids": [r.sample.sample_id for r in result.results],
            "scores": [r.scores for r in result.results],
            "examples": sum(r.example is not None for r in result.results),
            "skipped": [s.sample_id for s in result.skipped],
            "dice": result.metrics["dice"].micro,
            "manifest": str(manifest),
        }))


if __name__ == "__main__":
    from medsight.train import distributed

    mode, data_dir, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    with distributed.process_group():
        {"samples": samples, "eval": evaluation}[mode](data_dir, out_dir)

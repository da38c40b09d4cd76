"""``medsight data prepare biomedparse SRC DEST``: index a release as published, copy nothing.

Per sub-dataset and split: resolve names (modality spelling -> taxonomy via aliases, mask name
or category -> region class), skip images with more masks than ``max_masks_per_image`` (the
authors' rule), check every file in worker processes (missing, truncated, size mismatch, empty
mask), carve a deterministic val split out of train (per sub-dataset, by seeded hash rank), and
append one JSON line per usable image to ``DEST/biomedparse/{train,val,test}.jsonl``. The
region classes are collected from the data unless the taxonomy template fixes them, and
``DEST/taxonomy.json`` is written. A few bad files are reported and skipped; the run stops
(leaving only its report) when the bad share exceeds ``max_bad_fraction``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from medsight.data.prepare.release import RELEASE_SPLITS, PendingImage, Subset, find_subsets, read_split
from medsight.data.prepare.report import ProblemLog, bad_fraction, finish_report, problems_path, report_path
from medsight.data.prepare.sampling import carve, chunked
from medsight.data.prepare.verify import LEVELS, ImageJob, Verified, verify_full, verify_header
from medsight.data.prepared_index import INDEX_DIR, SPLITS
from medsight.data.taxonomy import TAXONOMY_FILE, Taxonomy
from medsight.data.taxonomy_template import TaxonomyTemplate
from medsight.io_utils import atomic_directory, atomic_write_json

RELEASE = "biomedparse"
_CHUNK = 2048  # images handed to the worker pool at a time (bounds the futures held)


@dataclass
class BiomedParseOptions:
    taxonomy: str = "biomedparse-18"  # shipped template name or a JSON file
    val_fraction: float = 0.05  # of each sub-dataset's train images
    seed: int = 0
    max_masks_per_image: int = 16
    max_bad_fraction: float = 0.01
    verify: str = "full"  # full (decode every file) | header (sizes only)
    workers: int = 0  # 0 = every CPU
    subsets: tuple[str, ...] = ()  # sub-dataset names (paths under SRC); empty = all


@dataclass
class PrepareSummary:
    dest: Path
    taxonomy: Taxonomy
    seen: int = 0
    bad: int = 0
    skipped: int = 0
    images: Counter = field(default_factory=Counter)  # split -> images
    per_modality: Counter = field(default_factory=Counter)  # (split, modality) -> images
    per_class: Counter = field(default_factory=Counter)  # (modality, class) -> regions (all splits)

    def table(self) -> str:
        """Counts per modality and class, the way the CLI prints them."""
        lines = [f"{'modality':24s} " + " ".join(f"{s:>8s}" for s in SPLITS)]
        for modality in self.taxonomy.modalities:
            row = [self.per_modality[(split, modality)] for split in SPLITS]
            if any(row):
                lines.append(f"{modality:24s} " + " ".join(f"{n:8d}" for n in row))
        lines.append(f"{'total':24s} " + " ".join(f"{self.images[s]:8d}" for s in SPLITS))
        lines.append("")
        lines.append(f"{'modality':24s} {'class':32s} {'regions':>8s}")
        for (modality, name), count in sorted(self.per_class.items()):
            lines.append(f"{modality:24s} {name:32s} {count:8d}")
        return "\n".join(lines)


def _mapper(level: str, workers: int) -> tuple[Callable[[ImageJob], Verified], int]:
    if level not in LEVELS:
        raise ValueError(f"verify={level!r}: choose one of {', '.join(LEVELS)}")
    return (verify_full if level == "full" else verify_header), (workers or os.cpu_count() or 1)


@contextmanager
def _pool(workers: int) -> Iterator[Callable[[Callable, list], Iterable]]:
    if workers <= 1:
        yield map
        return
    with ProcessPoolExecutor(max_workers=workers) as executor:
        yield lambda fn, jobs: executor.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 4)))


def _kind(reason: str) -> str:
    if "does not exist" in reason:
        return "missing file"
    if "but its image is" in reason:
        return "size mismatch"
    if "empty" in reason:
        return "empty mask"
    return "unreadable file"


class _IndexWriter:
    """Appends index lines per split and keeps the counts of what it wrote."""

    def __init__(self, folder: Path, dest: Path, summary: PrepareSummary, stack: ExitStack) -> None:
        self.dest = dest
        self._relative: dict[str, str] = {}  # release folder -> path relative to dest (once each)
        self.summary = summary
        self.files = {split: stack.enter_context(open(folder / f"{split}.jsonl", "w", encoding="utf-8")) for split in SPLITS}
        self.classes: set[str] = set()

    def relative(self, folder: str) -> str:
        if folder not in self._relative:
            self._relative[folder] = os.path.relpath(folder, self.dest)
        return self._relative[folder]

    def write(self, split: str, subset: Subset, release_split: str, image: PendingImage, keep: list[int],
              result: Verified) -> None:
        image_dir = self.relative(f"{subset.root}/{release_split}")
        mask_dir = self.relative(f"{subset.root}/{release_split}_mask")
        regions = []
        for index in keep:
            region = image.regions[index]
            area = result.areas[index] if index < len(result.areas) else float("nan")
            if area != area and region.area is not None and result.height * result.width:
                area = region.area / (result.height * result.width)  # measured: else the release's own
            regions.append({"mask": f"{mask_dir}/{region.mask_file}", "class": region.class_name,
                            "sentences": region.sentences, "bbox": region.bbox,
                            "area": None if area != area else round(area, 6)})
            self.classes.add(region.class_name)
            self.summary.per_class[(image.modality, region.class_name)] += 1
        entry = {"id": image.file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0], "subset": subset.name, "image": f"{image_dir}/{image.file_name}",
                 "modality": image.modality, "spelling": image.spelling, "site": image.site,
                 "height": result.height, "width": result.width, "regions": regions}
        self.files[split].write(json.dumps(entry) + "\n")
        self.summary.images[split] += 1
        self.summary.per_modality[(split, image.modality)] += 1


def _index_split(subset: Subset, release_split: str, pending: list[PendingImage], options: BiomedParseOptions,
                 log: ProblemLog, writer: _IndexWriter, pool: Callable, verify: Callable, progress) -> int:
    """Check and index one sub-dataset split; returns how many images were dropped as bad."""
    where = {"subset": subset.name, "split": release_split}
    image_dir, mask_dir = f"{subset.root}/{release_split}", f"{subset.root}/{release_split}_mask"
    bad, usable = 0, []
    for image in pending:
        path = f"{image_dir}/{image.file_name}"
        if len(image.regions) > options.max_masks_per_image:
            log.skip(path, f"{len(image.regions)} masks, more than max_masks_per_image={options.max_masks_per_image}",
                     "too many masks", **where)
            writer.summary.skipped += 1
        elif not image.regions:
            log.problem(path, "no annotation refers to this image", "image dropped", "no annotation", **where)
            bad += 1
        else:
            usable.append(image)
    val = carve([i.file_name for i in usable], options.val_fraction, options.seed, subset.name) if release_split == "train" else set()
    for chunk in chunked(usable, _CHUNK):
        jobs = [ImageJob(f"{image_dir}/{i.file_name}", tuple(f"{mask_dir}/{r.mask_file}" for r in i.regions))
                for i in chunk]
        for image, job, result in zip(chunk, jobs, pool(verify, jobs)):
            progress.update(1)
            if result.image_problem is not None:
                log.problem(job.image, result.image_problem, "image dropped", _kind(result.image_problem), **where)
                bad += 1
                continue
            fatal = {i: reason for i, reason in result.mask_problems.items() if i not in result.empty_masks}
            for i, reason in sorted(result.mask_problems.items()):
                action = "image dropped" if fatal else "region dropped"
                log.problem(job.masks[i], reason, action, _kind(reason), **where)
            keep = [i for i in range(len(image.regions)) if i not in result.mask_problems]
            if fatal or not keep:
                bad += 1
                continue
            split = "val" if image.file_name in val else release_split
            writer.write(split, subset, release_split, image, keep, result)
    return bad


def prepare_biomedparse(source: Path, dest: Path, options: BiomedParseOptions | None = None,
                        template: TaxonomyTemplate | None = None, progress: bool = True) -> PrepareSummary:
    """Index the release at ``source`` into ``dest``; see the module docstring."""
    options = options or BiomedParseOptions()
    source, dest = Path(source).resolve(), Path(dest).resolve()
    template = template or TaxonomyTemplate.load(options.taxonomy)
    if not 0 <= options.val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {options.val_fraction}")
    verify, workers = _mapper(options.verify, options.workers)
    subsets = find_subsets(source, options.subsets)
    report_file = report_path(dest, RELEASE)
    report_file.parent.mkdir(parents=True, exist_ok=True)
    problems_final = problems_path(dest, RELEASE)
    problems_tmp = problems_final.with_suffix(".jsonl.tmp")
    summary = PrepareSummary(dest, Taxonomy(template.modalities, ("-",), frozenset()))
    finished = False
    try:
        with ExitStack() as stack, atomic_directory(dest / INDEX_DIR) as folder:
            log = ProblemLog(stack.enter_context(open(problems_tmp, "w", encoding="utf-8")), root=str(dest))
            writer = _IndexWriter(folder, dest, summary, stack)
            pool = stack.enter_context(_pool(workers))
            bar = stack.enter_context(tqdm(desc="prepare biomedparse", unit="img", disable=not progress))
            for subset in subsets:
                for release_split in RELEASE_SPLITS:
                    if not (subset.root / f"{release_split}.json").is_file():
                        continue
                    pending, seen = read_split(subset, release_split, template, log)
                    summary.seen += seen
                    summary.bad += seen - len(pending)
                    summary.bad += _index_split(subset, release_split, pending, options, log, writer, pool, verify, bar)
            summary.taxonomy = template.complete(writer.classes, str(dest / TAXONOMY_FILE))
            report = {
                "release": RELEASE, "source": os.path.relpath(source, dest), "options": asdict(options),
                "taxonomy": template.source, "subsets": [s.name for s in subsets],
                "seen": summary.seen, "bad": summary.bad, "skipped": summary.skipped,
                "bad_fraction": bad_fraction(summary.bad, summary.seen), "indexed": dict(summary.images),
                **log.to_dict(),
            }
            stack.close()  # flush the index and problem files before they are swapped in
            finished = True
            finish_report(dest, RELEASE, report, options.max_bad_fraction)
            atomic_write_json(folder / "summary.json", {
                "images": dict(summary.images),
                "per_modality": {f"{s}/{m}": n for (s, m), n in sorted(summary.per_modality.items())},
                "per_class": {f"{m}/{c}": n for (m, c), n in sorted(summary.per_class.items())},
            })
    finally:
        if finished and problems_tmp.exists():
            os.replace(problems_tmp, problems_final)
        elif problems_tmp.exists():
            problems_tmp.unlink()
    summary.taxonomy.save(dest / TAXONOMY_FILE)
    return summary

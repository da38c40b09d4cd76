"""Benchmark: ``medsight data prepare biomedparse`` on a large generated release.

Builds a release in the published layout with ``--entries`` indexed images (generated file names
spread over ``--subsets`` sub-datasets, two masks each) whose files are hard links to a few real
PNGs, then prepares it in a fresh process per setting and reports wall time and the peak RSS of
the largest process. Memory should stay flat as the entry count grows (one sub-dataset's entries
at a time, the index streamed to disk).

    python bench/bench_prepare.py --entries 25000,100000 --verify full,header --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REAL_IMAGES = 8  # distinct real PNGs every entry links to


def build_release(root: Path, entries: int, subsets: int, size: int) -> None:
    rng = np.random.default_rng(0)
    sources = root / "_sources"
    sources.mkdir(parents=True)
    for n in range(REAL_IMAGES):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(sources / f"image{n}.png")
        for k, x in enumerate((size // 8, size // 2)):
            mask = np.zeros((size, size), np.uint8)
            mask[size // 8 : size // 3, x : x + size // 4] = 255
            Image.fromarray(mask).save(sources / f"mask{n}_{k}.png")
    per_subset = -(-entries // subsets)
    made = 0
    for s in range(subsets):
        folder = root / "release" / f"Subset{s:02d}"
        count = min(per_subset, entries - made)
        split = "train" if s < subsets - 1 else "test"
        (folder / split).mkdir(parents=True)
        (folder / f"{split}_mask").mkdir()
        images, annotations = [], []
        for i in range(count):
            stem = f"case{made + i:07d}_slice{i % 97:03d}_CT_abdomen"
            source = (made + i) % REAL_IMAGES
            os.link(sources / f"image{source}.png", folder / split / f"{stem}.png")
            images.append({"id": i, "file_name": f"{stem}.png", "width": size, "height": size})
            for k, target in enumerate(("liver", "liver tumor")):
                mask_file = f"{stem}_{target.replace(' ', '+')}.png"
                os.link(sources / f"mask{source}_{k}.png", folder / f"{split}_mask" / mask_file)
                annotations.append({"id": len(annotations), "image_id": i, "file_name": f"{stem}.png", "mask_file": mask_file,
                                    "category_id": k + 1, "bbox": [0, 0, 1, 1], "sentences": [{"sent": f"{target} in abdomen CT"}]})
        coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "liver"}, {"id": 2, "name": "liver tumor"}]}
        (folder / f"{split}.json").write_text(json.dumps(coco))
        made += count


_CHILD = """
import json, sys, time
from medsight.data.prepare.biomedparse import BiomedParseOptions, prepare_biomedparse
src, dest, verify, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
started = time.perf_counter()
summary = prepare_biomedparse(src, dest, BiomedParseOptions(verify=verify, workers=workers), progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "indexed": sum(summary.images.values()), "bad": summary.bad}))
"""


def run_prepare(src: Path, dest: Path, verify: str, workers: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dest), verify, str(workers)],
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # ru_maxrss of children is a running maximum: a later, smaller run reports the earlier peak.
    return {**result, "wall": wall, "peak_rss_mib": peak_kib / 1024, "peak_is_running_max": peak_kib == before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="25000,100000")
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--verify", default="full,header")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for entries in [int(n) for n in args.entries.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
            root = Path(tmp)
            started = time.perf_counter()
            build_release(root, entries, args.subsets, args.image_size)
            built = time.perf_counter() - started
            for verify in args.verify.split(","):
                result = run_prepare(root / "release", root / f"prepared_{verify}", verify, args.workers)
                rows.append((entries, verify, result, built))
                print(f"{entries} entries, verify={verify}: {result['wall']:.1f} s wall ({result['seconds']:.1f} s in "
                      f"prepare), peak RSS {result['peak_rss_mib']:.0f} MiB, {result['indexed']} indexed", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, workers={args.workers}, "
          f"{args.subsets} sub-datasets, {args.image_size}x{args.image_size} PNGs, 2 masks per image\n")
    print("| entries | verify | prepare (s) | wall incl. start-up (s) | entries/s | peak RSS (MiB) | release build (s, not timed) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for entries, verify, r, built in rows:
        print(f"| {entries:,} | {verify} | {r['seconds']:.1f} | {r['wall']:.1f} | {entries / r['seconds']:,.0f} | "
              f"{r['peak_rss_mib']:.0f}{' (max so far)' if r['peak_is_running_max'] else ''} | {built:.1f} |")


if __name__ == "__main__":
    main()

"""WD tagger throughput on a CPU: `loracap caption --model TAGGER` against the loop of sd-scripts'
`finetune/tag_images_by_wd14_tagger.py --onnx` on the same ONNX graph and the same images, images/s of each,
ratio last.

    python benchmarks/tagger_throughput.py --size tiny --images 256 --rounds 3
    python benchmarks/tagger_throughput.py --size full --images 8 --rounds 2    # wd-vit-tagger-v3's size

`--size tiny` is the test kit's tagger (a small convnet at 64 px, 27 tags); `--size full` a random-weight
ViT-B/16 at 448 px with 10,861 tags, wd-vit-tagger-v3's shape (`loracap.testing.tagger_models`). Images are
photo-sized JPEGs (1024x768 to 1600x900), as in the other benchmarks.

The sd-scripts side is a copy of that script's loop (sd-scripts is not installed here; see `sd_scripts_run`):
PIL opens and converts each image, `preprocess_image` pads it square with white in BGR and resizes it with
cv2 (INTER_AREA when shrinking; PIL's BOX filter, its equivalent, when cv2 is not installed: the output says
which), float32 NHWC batches go through `ort_sess.run(None, {input_name: batch})`, the probabilities are
thresholded in Python and each caption file written. Its two shapes: the defaults (`--batch_size 1`, images
read in the loop) and the tuned command (`--batch_size B --max_data_loader_n_workers 2`, a torch DataLoader).
loracap runs `caption_folder` on the loaded backend with its 2 decode threads, at batch 1 against the first
and at `--batch-size B` against the second: each pair compares the loops at one batch size.

Fairness: each run is its own process, the sides take turns in each round, medians are compared. Both
sides give onnxruntime the same intra-op thread count (`--threads`: loracap's session reads OMP_NUM_THREADS,
sd-scripts' session gets `intra_op_num_threads`), the same thresholds (general 0.35, character 0.85) and a
warm-up call at the batch size before the clock starts; model loading is excluded, reading, preprocessing,
tagging and writing every caption file are included. The tags each side wrote are compared at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# In pairs at one batch size: sd-scripts' defaults against loracap at batch 1, then the tuned command
# against loracap at --batch-size B. (A ViT at 448 px is no faster a image at batch 8 than at 1 on a CPU.)
SIDES = ("sd-scripts", "loracap-b1", "sd-scripts-tuned", "loracap")
GENERAL_THRESHOLD, CHARACTER_THRESHOLD = 0.35, 0.85
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # sd-scripts' train_util, without upper case


# --- sd-scripts' loop, as tag_images_by_wd14_tagger.py has it (names and structure kept) -----------------


def _resize(image: np.ndarray, side: int, shrink: bool) -> np.ndarray:
    try:
        import cv2
    except ImportError:  # PIL's BOX is cv2's INTER_AREA (a pixel-area average) for shrinking
        from PIL import Image

        resample = Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
        return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((side, side), resample))
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4
    return cv2.resize(image, (side, side), interpolation=interp)


def preprocess_image(image, side: int) -> np.ndarray:
    image = np.array(image)
    image = image[:, :, ::-1]  # RGB->BGR

    # pad to square
    size = max(image.shape[0:2])
    pad_x = size - image.shape[1]
    pad_y = size - image.shape[0]
    pad_l = pad_x // 2
    pad_t = pad_y // 2
    image = np.pad(
        image, ((pad_t, pad_y - pad_t), (pad_l, pad_x - pad_l), (0, 0)), mode="constant", constant_values=255
    )
    image = _resize(image, side, size > side)
    return image.astype(np.float32)


class ImageLoadingPrepDataset:  # a torch Dataset in sd-scripts; DataLoader needs only these two methods
    def __init__(self, image_paths: list[Path], side: int) -> None:
        self.images, self.side = image_paths, side

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int):
        from PIL import Image

        img_path = str(self.images[idx])
        try:
            image = Image.open(img_path).convert("RGB")
            image = preprocess_image(image, self.side)
        except Exception as e:  # noqa: BLE001 - as sd-scripts: a bad image is logged and skipped
            print(f"Could not load image path: {img_path}, error: {e}", file=sys.stderr)
            return None
        return (image, img_path)


def collate_fn_remove_corrupted(batch):
    return list(filter(lambda x: x is not None, batch))


def sd_scripts_run(model: Path, images: Path, batch_size: int, workers: int | None, threads: int) -> float:
    """tag_images_by_wd14_tagger.py's main() from the session on, with `--onnx --batch_size batch_size
    [--max_data_loader_n_workers workers] --general_threshold 0.35 --character_threshold 0.85`; returns the
    seconds the loop took (the session is created and warmed up before the clock starts). Left out: its
    tqdm bar and the debug / frequency output."""
    import onnxruntime as ort
    from PIL import Image

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # sd-scripts leaves onnxruntime's default; equal threads here
    ort_sess = ort.InferenceSession(str(model / "model.onnx"), options, providers=["CPUExecutionProvider"])
    input_name = ort_sess.get_inputs()[0].name
    side = int(ort_sess.get_inputs()[0].shape[1])  # IMAGE_SIZE = 448 there; the tiny kit's graph is 64
    ort_sess.run(None, {input_name: np.zeros((batch_size, side, side, 3), np.float32)})  # warm-up

    with open(model / "selected_tags.csv", encoding="utf-8") as f:
        reader = csv.reader(f)
        line = [row for row in reader]
        header = line[0]  # tag_id,name,category,count
        rows = line[1:]
    assert header[0] == "tag_id" and header[1] == "name" and header[2] == "category", header
    rating_tags = [row[1] for row in rows[0:] if row[2] == "9"]
    general_tags = [row[1] for row in rows[0:] if row[2] == "0"]
    character_tags = [row[1] for row in rows[0:] if row[2] == "4"]
    caption_separator, undesired_tags = ", ", set()

    started = time.perf_counter()
    image_paths = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)

    def run_batch(path_imgs):
        imgs = np.array([im for _, im in path_imgs])
        probs = ort_sess.run(None, {input_name: imgs})[0]  # onnx output numpy
        probs = probs[: len(path_imgs)]
        for (image_path, _), prob in zip(path_imgs, probs, strict=True):
            combined_tags = []
            # First 4 labels are ratings, the rest are tags: pick any where prediction confidence >= threshold
            for i, p in enumerate(prob[len(rating_tags) :]):
                if i < len(general_tags) and p >= GENERAL_THRESHOLD:
                    tag_name = general_tags[i]
                    if tag_name not in undesired_tags:
                        combined_tags.append(tag_name)
                elif i >= len(general_tags) and p >= CHARACTER_THRESHOLD:
                    tag_name = character_tags[i - len(general_tags)]
                    if tag_name not in undesired_tags:
                        combined_tags.append(tag_name)
            caption_file = os.path.splitext(image_path)[0] + ".txt"
            tag_text = caption_separator.join(combined_tags)
            with open(caption_file, "w", encoding="utf-8") as f:
                f.write(tag_text + "\n")

    if workers is not None:
        from torch.utils.data import DataLoader

        dataset = ImageLoadingPrepDataset(image_paths, side)
        data = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate_fn_remove_corrupted,
            drop_last=False,
        )
    else:
        data = [[(None, ip)] for ip in image_paths]

    b_imgs = []
    for data_entry in data:
        for entry in data_entry:
            if entry is None:
                continue
            image, image_path = entry
            if image is None:
                try:
                    image = Image.open(image_path)
                    if image.mode != "RGB":
                        image = image.convert("RGB")
                    image = preprocess_image(image, side)
                except Exception as e:  # noqa: BLE001
                    print(f"Could not load image path: {image_path}, error: {e}", file=sys.stderr)
                    continue
            b_imgs.append((image_path, image))
            if len(b_imgs) >= batch_size:
                b_imgs = [(str(image_path), image) for image_path, image in b_imgs]
                run_batch(b_imgs)
                b_imgs.clear()
    if len(b_imgs) > 0:
        b_imgs = [(str(image_path), image) for image_path, image in b_imgs]
        run_batch(b_imgs)
    return time.perf_counter() - started


# --- loracap ------------------------------------------------------------------------------------------


def loracap_run(model: Path, images: Path, batch_size: int, workers: int) -> float:
    """`loracap caption IMAGES --model MODEL --existing overwrite --batch-size B --workers W` on the loaded
    tagger (its session's threads: OMP_NUM_THREADS, set by the parent); the run's own seconds."""
    from loracap.backends import load_backend
    from loracap.pipeline import caption_folder

    backend = load_backend(str(model), device="cpu")
    side = backend.image_side
    backend.session.run(None, {backend.input_name: np.zeros((batch_size, side, side, 3), np.float32)})
    summary = caption_folder(
        images, backend=backend, existing="overwrite", batch_size=batch_size, workers=workers, progress=False
    )
    # An image with no tag above the thresholds is a failed caption to loracap, but the model ran for it.
    assert summary.captioned + summary.failed == summary.total, summary.describe()
    return summary.seconds


# --- the parent: build, run the sides in turn, compare ------------------------------------------------


def one_run(side: str, model: Path, images: Path, batch: int, threads: int) -> dict:
    if side.startswith("loracap"):
        seconds = loracap_run(model, images, 1 if side == "loracap-b1" else batch, workers=2)
    elif side == "sd-scripts":
        seconds = sd_scripts_run(model, images, 1, None, threads)
    else:
        seconds = sd_scripts_run(model, images, batch, 2, threads)
    count = sum(1 for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    return {"side": side, "images_per_s": count / seconds, "seconds": seconds, "load": os.getloadavg()[0]}


def tag_sets(folder: Path) -> dict[str, set[str]]:
    return {
        p.stem: {t.strip() for t in p.read_text(encoding="utf-8").split(",") if t.strip()}
        for p in folder.glob("*.txt")
    }


def resize_name() -> str:
    try:
        import cv2
    except ImportError:
        return "PIL BOX / LANCZOS (cv2 not installed)"
    return f"cv2 {cv2.__version__} INTER_AREA / INTER_LANCZOS4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, taking turns")
    parser.add_argument("--batch-size", type=int, default=8, help="loracap's and tuned sd-scripts' batch")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, both sides")
    parser.add_argument("--model", help="a tagger folder (model.onnx, selected_tags.csv) instead of building")
    parser.add_argument("--one", nargs=3, metavar=("SIDE", "MODEL", "IMAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one run, one JSON line
        side, model, images = args.one
        print(json.dumps(one_run(side, Path(model), Path(images), args.batch_size, args.threads)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_settings import make_images

    from loracap.testing.tagger_models import build_tagger

    with tempfile.TemporaryDirectory(prefix="loracap-tagger-") as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else work / "model"
        if not args.model:
            model.mkdir()
            build_tagger("wd-tagger", model, size=args.size)
        (work / "images").mkdir()
        make_images(work / "images", args.images)
        folders = {side: work / side for side in SIDES}
        for folder in folders.values():
            shutil.copytree(work / "images", folder)
        tags = len((model / "selected_tags.csv").read_text(encoding="utf-8").splitlines()) - 1
        print(
            f"{args.size} tagger ({tags} tags), {args.images} JPEGs, batch {args.batch_size}, "
            f"{args.threads} onnxruntime thread(s), resize: {resize_name()}; {os.cpu_count()} CPUs"
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        results: dict[str, list[dict]] = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            for side in SIDES:
                command = [sys.executable, __file__, "--one", side, str(model), str(folders[side])]
                command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"{side} run failed:\n{done.stderr[-3000:]}")
                run = json.loads(done.stdout.strip().splitlines()[-1])
                results[side].append(run)
                print(
                    f"round {round_ + 1} {side:16}: {run['images_per_s']:8.2f} images/s "
                    f"({run['seconds']:.1f} s, load {run['load']:.1f})",
                    flush=True,
                )
        rates = {side: statistics.median(r["images_per_s"] for r in runs) for side, runs in results.items()}
        for side, rate in rates.items():
            print(f"median {side:16}: {rate:.2f} images/s")
        ours, theirs = tag_sets(folders["loracap"]), tag_sets(folders["sd-scripts-tuned"])
        same = sum(ours.get(stem) == tagged for stem, tagged in theirs.items())
        print(f"tags equal (as sets) on {same} of {len(theirs)} images")
        print(
            f"ratio loracap / sd-scripts: {rates['loracap-b1'] / rates['sd-scripts']:.2f} at batch 1 (its "
            f"defaults: no DataLoader), {rates['loracap'] / rates['sd-scripts-tuned']:.2f} at batch "
            f"{args.batch_size} (its --max_data_loader_n_workers 2)"
        )


if __name__ == "__main__":
    main()

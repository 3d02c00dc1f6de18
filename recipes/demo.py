"""Make the demo folder: a few photos qalign-tiny never saw in training, clean and degraded.

For each photo: the clean copy, JPEG quality 10, Gaussian blur sigma 3 and white noise sigma 25.
`make demo` then scores the folder; the clean copy should score highest.

    python recipes/demo.py --out runs/demo [--pristine DIR] [--count 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from qalign.data.synthetic import list_sources, split_sources

SHARED_PRISTINE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pristine"


def degraded_copies(image: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 25.0, size=(image.height, image.width, 3))
    return {
        "clean": image,
        "blur_sigma3": image.filter(ImageFilter.GaussianBlur(3)),
        "noise_sigma25": Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--pristine", default=str(SHARED_PRISTINE), help="folder of clean photos")
    parser.add_argument("--count", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.pristine).is_dir():
        raise SystemExit(f"demo: no photo folder at {args.pristine}. The demo uses the project's shared photos "
                         "(../shared/data/pristine beside the repository); point it at any folder of photos with "
                         "`make demo PRISTINE=/path/to/photos`.")
    # The held-out split of the training recipe (same seed): photos the model never saw.
    _, held_out = split_sources(list_sources(args.pristine), test_fraction=0.2, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for path in held_out[: args.count]:
        image = Image.open(path).convert("RGB")
        for name, version in degraded_copies(image, rng).items():
            version.save(out / f"{Path(path).stem}__{name}.png")
        image.save(out / f"{Path(path).stem}__jpeg_q10.jpg", quality=10)
    print(f"demo images in {out}")


if __name__ == "__main__":
    main()

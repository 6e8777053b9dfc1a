"""Clean colour photos that ship inside installed packages (nothing is downloaded).

``SAMPLE_PHOTOS`` is the catalogue: photo key -> (package, file inside it). A package that is not
installed just removes its photos. Two readers use it: the IQA audit (``iqa/audit_photos.py``
splits it into tune and report photos) and the demo data's ``unseen`` split (``data/demo.py``:
real-domain pairs of the photos no other demo split is cut from). This module imports no torch, so
building the demo data stays quick.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# photo key -> (package, path inside the package). Natural colour photos only: no synthetic charts,
# silhouettes, graphics or mostly black astronomy frames.
SAMPLE_PHOTOS: dict[str, tuple[str, str]] = {
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "cheetah_run": ("gradio", "media_assets/images/cheetah.jpg"),
    "cheetah_cub": ("gradio", "media_assets/images/cheetah1.jpg"),
    "cheetah_face": ("gradio", "test_data/cheetah2.jpg"),
    "groot": ("gradio", "media_assets/images/groot.jpeg"),
    "lion": ("gradio", "media_assets/images/lion.jpg"),
    "tower": ("gradio", "media_assets/images/tower.jpg"),
    # Kodak-style reference photos and test frames that ship with pyiqa (read, never redistributed)
    "caps": ("ResultsCalibra", "ref_dir/I03.bmp"),
    "portrait": ("ResultsCalibra", "ref_dir/I04.bmp"),
    "boat": ("ResultsCalibra", "ref_dir/I06.bmp"),
    "houses": ("ResultsCalibra", "ref_dir/I08.bmp"),
    "lighthouse": ("ResultsCalibra", "ref_dir/I19.bmp"),
    "night_street": ("tests", "test_efficiency_img_dir/SPAQ_10241.jpg"),
    "garden": ("tests", "test_efficiency_img_dir/frame_4wrwr48cdk6rbcjl.jpg"),
    "sunset": ("tests", "test_efficiency_img_dir/frame_7gzdcz9sif0ekg31.jpg"),
    "snow_traffic": ("tests", "test_efficiency_img_dir/frame_9ogwhvvy7gfj6jzh.jpg"),
}


def photo_path(key: str) -> Path | None:
    """The file of a catalogue photo, or None when its package (or the file) is not installed."""
    package, rel = SAMPLE_PHOTOS[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / rel
        if path.is_file():
            return path
    return None


def read_photo(path: Path) -> np.ndarray:
    """uint8 RGB (H, W, 3); a grey file is repeated over the channels, alpha is dropped."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))

"""Face image folders, RecordIO and ``.bin`` files written for tests with the
project's own converters."""
import os

import cv2
import numpy as np
from helpers import load_tool


def converter(name: str):
    """``tools/dataset_converters/{name}.py`` as a module."""
    return load_tool('dataset_converters', f'{name}.py')


def make_faces(root, counts=(2, 3, 4), size=12, seed=0) -> dict:
    """``root/id{c}/{i}.png`` noise images; returns {path: (bytes, label)}."""
    rng = np.random.default_rng(seed)
    files = {}
    for label, count in enumerate(counts):
        os.makedirs(os.path.join(root, f'id{label}'), exist_ok=True)
        for i in range(count):
            path = os.path.join(root, f'id{label}', f'{i}.png')
            img = rng.integers(0, 256, (size, size, 3), np.uint8)
            data = cv2.imencode('.png', img)[1].tobytes()
            with open(path, 'wb') as f:
                f.write(data)
            files[path] = (data, label)
    return files

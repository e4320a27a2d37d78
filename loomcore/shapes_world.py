"""The Shapes world's words: its colours, shapes and directions.

The synthetic data draws its scenes from them, the tiny CLIP stand-in tokenizes them, ShapesBench,
the Shapes judge and the RL reward read images back in them. A bottom-level module (no project
imports) so that models and data can share it without depending on each other.
"""

from __future__ import annotations

from typing import Dict, Tuple

# Far apart in RGB (pairwise distance > 100), so a pixel's nearest named colour is unambiguous.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 10),
    "cyan": (20, 200, 210),
    "black": (20, 20, 20),
}
REF_BACKGROUND = ("white", (255, 255, 255))  # reference images: one shape on plain white
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

"""A dependency-free PNG line plot (zlib + struct), so the example needs no matplotlib.

Two stacked panels: mean reward per step (0..2) and greedy exact-match (0..1), with a 3x5
pixel font for the titles and tick labels. Enough to see a learning curve, nothing more.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence

Color = tuple[int, int, int]
FONT = {  # 3x5 glyphs, rows top to bottom; characters not listed draw as blanks
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "A": "010101111101101", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "G": "011100101101011", "H": "101101111101101",
    "M": "101111111101101", "N": "110101101101101", "P": "110101110100100",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010",
}  # fmt: skip


class Canvas:
    """An RGB pixel grid with just the drawing operations a line plot needs."""

    def __init__(self, width: int, height: int, bg: Color = (255, 255, 255)) -> None:
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def dot(self, x: int, y: int, c: Color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i : i + 3] = bytes(c)

    def line(self, x0: int, y0: int, x1: int, y1: int, c: Color) -> None:
        """Bresenham: every pixel on the segment, no anti-aliasing."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, c)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, c: Color = (0, 0, 0), scale: int = 2) -> None:
        for k, ch in enumerate(s.upper()):
            bits = FONT.get(ch, "0" * 15)
            for i, b in enumerate(bits):
                if b == "1":
                    for u in range(scale * scale):
                        gx = x + (4 * k + i % 3) * scale + u % scale
                        self.dot(gx, y + (i // 3) * scale + u // scale, c)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        stride = 3 * self.w
        raw = b"".join(b"\0" + self.px[y * stride : (y + 1) * stride] for y in range(self.h))
        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def panel(
    cv: Canvas,
    box: tuple[int, int, int, int],
    xs: Sequence[float],
    ys: Sequence[float],
    y_max: float,
    x_max: float,
    title: str,
    color: Color,
) -> None:
    """Axes, four y ticks and one polyline inside `box` = (left, top, right, bottom)."""
    left, top, right, bottom = box
    grey = (200, 200, 200)
    for k in range(5):
        y = bottom - (bottom - top) * k // 4
        cv.line(left, y, right, y, grey)
        cv.text(4, y - 5, f"{y_max * k / 4:.2f}")
    cv.line(left, top, left, bottom, (0, 0, 0))
    cv.line(left, bottom, right, bottom, (0, 0, 0))
    cv.text(left + 8, top - 14, title, color)

    def to_px(x: float, y: float) -> tuple[int, int]:
        fx, fy = x / max(x_max, 1e-9), min(max(y / y_max, 0.0), 1.0)
        return left + round(fx * (right - left)), bottom - round(fy * (bottom - top))

    pts = [to_px(x, y) for x, y in zip(xs, ys, strict=True)]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        cv.line(x0, y0, x1, y1, color)
        cv.line(x0, y0 + 1, x1, y1 + 1, color)  # two pixels thick


def write_curves(
    path: str,
    steps: Sequence[int],
    rewards: Sequence[float],
    evals: Sequence[tuple[int, float]],
    reward_max: float = 2.0,
) -> None:
    """Write the training plot: mean reward per step on top, (step, exact-match) below."""
    cv = Canvas(720, 520)
    x_max = float(max([*steps, *(s for s, _ in evals), 1]))
    panel(cv, (48, 24, 700, 236), steps, rewards, reward_max, x_max, "MEAN REWARD", (200, 60, 30))
    ex, ey = [s for s, _ in evals], [e for _, e in evals]
    panel(cv, (48, 276, 700, 488), ex, ey, 1.0, x_max, "GREEDY EXACT MATCH", (30, 90, 200))
    cv.text(48, 500, "0")
    label = f"STEP {int(x_max)}"
    cv.text(700 - 8 * len(label), 500, label)
    with open(path, "wb") as f:
        f.write(cv.png())

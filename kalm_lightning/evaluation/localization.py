"""How well boxes find lesions: hit rate (lesion centre inside the box), mean IoU, mean box area;
for a model that reads K windows, inside any of them too."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kalm_lightning.data.geometry import LESION_BOX, PIXEL_BOX, box_iou, crop_box, windows_in


def inside(boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether each point (x, y) [N, 2] lies in its box (x0, y0, x1, y1) [N, 4], edges included."""
    x, y = points[:, 0], points[:, 1]
    return (x >= boxes[:, 0]) & (x <= boxes[:, 2]) & (y >= boxes[:, 1]) & (y <= boxes[:, 3])


def hits(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """A hit: the true box's centre inside the predicted box (both [N, 4], x0, y0, x1, y1)."""
    return inside(pred, np.stack([true[:, [0, 2]].mean(1), true[:, [1, 3]].mean(1)], 1))


def localization_scores(frame: pd.DataFrame, lesions: pd.DataFrame) -> dict[str, float]:
    """Hit rate (lesion centre inside the KALM box), mean IoU and mean box area (its share of the
    image, where the frame has `box_area`) over the images with a lesion box. Where the model
    reads K windows (the frame's `crop*` columns), `hit_rate` is the lesion centre inside any of
    them, `hit_rate_top` inside the one weighed most (the KALM box), `mean_best_iou` the IoU of
    the best window, `mean_total_area` the windows' total share of the image.

    frame: the prediction table (its `file`, the image's absolute path, and the KALM box in
    original pixels, PIXEL_BOX); lesions: `path` (absolute) and the true box (LESION_BOX) in the
    same pixels."""
    truth = lesions[["path", *LESION_BOX]].rename(columns={"path": "file"})
    merged = frame.merge(truth, on="file")
    if merged.empty:
        return {
            "hit_rate": float("nan"),
            "mean_iou": float("nan"),
            "mean_area": float("nan"),
            "n": 0,
        }
    pred = merged[PIXEL_BOX].to_numpy(float)
    true = merged[LESION_BOX].to_numpy(float)
    hit = hits(pred, true)
    scores = {
        "hit_rate": float(hit.mean()),
        "mean_iou": float(box_iou(pred, true).mean()),
        "mean_area": float(merged["box_area"].mean()) if "box_area" in merged else float("nan"),
        "n": len(merged),
    }
    windows = [crop_box(k) for k in range(1, windows_in(merged) + 1)]
    if windows:  # K windows: hit_rate over any of them, hit_rate_top the one weighed most
        crops = np.stack([merged[w].to_numpy(float) for w in windows])  # [K, N, 4]
        scores.update(
            hit_rate=float(np.any([hits(c, true) for c in crops], axis=0).mean()),
            hit_rate_top=float(hit.mean()),
            mean_best_iou=float(np.max([box_iou(c, true) for c in crops], axis=0).mean()),
            mean_total_area=float(merged["crops_area"].mean()),
            windows=len(windows),
        )
    return scores

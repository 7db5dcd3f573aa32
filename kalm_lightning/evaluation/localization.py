"""How well boxes find lesions: hit rate (lesion centre inside the box), mean IoU, mean box area."""

from __future__ import annotations

import pandas as pd

from kalm_lightning.data.geometry import LESION_BOX, PIXEL_BOX, box_iou


def localization_scores(frame: pd.DataFrame, lesions: pd.DataFrame) -> dict[str, float]:
    """Hit rate (lesion centre inside the KALM box), mean IoU and mean box area (its share of the
    image, where the frame has `box_area`) over the images with a lesion box.

    frame: one row per image with `path` and the KALM box in original pixels (PIXEL_BOX);
    lesions: `path` and the true box (LESION_BOX) in the same pixels."""
    merged = frame.merge(lesions[["path", *LESION_BOX]], on="path")
    if merged.empty:
        return {
            "hit_rate": float("nan"),
            "mean_iou": float("nan"),
            "mean_area": float("nan"),
            "n": 0,
        }
    pred = merged[PIXEL_BOX].to_numpy(float)
    true = merged[LESION_BOX].to_numpy(float)
    cx, cy = (true[:, 0] + true[:, 2]) / 2, (true[:, 1] + true[:, 3]) / 2
    hit = (cx >= pred[:, 0]) & (cx <= pred[:, 2]) & (cy >= pred[:, 1]) & (cy <= pred[:, 3])
    return {
        "hit_rate": float(hit.mean()),
        "mean_iou": float(box_iou(pred, true).mean()),
        "mean_area": float(merged["box_area"].mean()) if "box_area" in merged else float("nan"),
        "n": len(merged),
    }

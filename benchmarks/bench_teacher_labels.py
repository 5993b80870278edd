"""How steady EfficientNet-Lite0's ImageNet labels are on real footage, frame by frame.

For a video benchmark that distils the image network into a pipelined video network, the
image network is the teacher: this measures, on the first 64 frames of each packaged clip
(pipecomp.footage, centre 224×224), how often its top-1 label changes from one frame to the
next, how many labels it uses, its most frequent ones and its mean top-1 probability.

Run: `python benchmarks/bench_teacher_labels.py` (under a minute); writes
results/teacher_labels.json and .md.
"""
from collections import Counter

import torch

from _results import machine, save
from pipecomp import footage, models

FRAMES, SIZE = 64, 224


def labels(model, clip):
    with torch.no_grad():
        probs = torch.cat([model(models.normalize(batch)).softmax(1) for batch in clip.split(16)])
    top = probs.max(1)
    return top.indices.tolist(), top.values.mean().item()


def main():
    torch.manual_seed(0)
    model, names = models.efficientnet_lite0(), models.categories()
    rows = {}
    for clip_name in footage.CLIPS:
        top1, confidence = labels(model, footage.decode(clip_name, FRAMES, SIZE))
        changes = sum(a != b for a, b in zip(top1, top1[1:]))
        rows[clip_name] = {
            "file": footage.footage(clip_name).name,
            "top1_changes": changes,
            "change_rate": changes / (FRAMES - 1),
            "distinct_labels": len(set(top1)),
            "most_frequent": [[names[i], n] for i, n in Counter(top1).most_common(5)],
            "mean_top1_probability": confidence,
            "top1": [names[i] for i in top1],
        }
    table = "\n".join(
        ["| clip | top-1 changes between consecutive frames | distinct top-1 labels | most frequent top-1 "
         "labels (frames) | mean top-1 probability |", "| --- | --- | --- | --- | --- |"]
        + [f"| {r['file']} | {r['top1_changes']} of {FRAMES - 1} ({r['change_rate']:.0%}) | {r['distinct_labels']} | "
           + ", ".join(f"{label} ({n})" for label, n in r["most_frequent"])
           + f" | {r['mean_top1_probability']:.2f} |" for r in rows.values()]
        + ["", f"_EfficientNet-Lite0, first {FRAMES} frames of each clip, centre {SIZE}×{SIZE}; {machine()}._"])
    save("teacher_labels", {"frames": FRAMES, "size": SIZE, "clips": rows}, table)


if __name__ == "__main__":
    main()

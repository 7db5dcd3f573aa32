"""The navigator's variants `navigator_cost.py` runs against the shipped one (issue 32), each a
`localizer=navigator` row with its options over the shipped defaults, and the keys `--rows` names
them by."""

from __future__ import annotations

from experiments.localizers.plan import Row


def variant(name: str, *options: str) -> Row:
    """A learned row: `localizer=navigator` with these options over its shipped defaults."""
    return Row(name, "kalm", (), ("localizer=navigator", *options), kind="learned")


SHIPPED = variant("navigator as shipped")
CHEAP = variant(
    "navigator, teacher at the crops' scale, one crop per image",
    "localizer.teacher_size=crops",
    "localizer.train_crops=1",
)
TAUGHT = variant(
    "navigator, teacher on the taught images, one crop per image",
    "localizer.train_crops=1",
    "localizer.teacher_images=taught",
)
ONE_CROP = variant(  # not cheaper (the teacher on every image): which of the two changes loses hits
    "navigator, teacher on every image, one crop per image",
    "localizer.train_crops=1",
    "localizer.teacher_images=all",
)
TAUGHT_WARM = variant(  # CNN_l on drawn anchors alone for two epochs, then taught for three
    "navigator, teacher on the taught images, one crop per image, two warm-up epochs",
    *TAUGHT.stage2[1:],
    "localizer.warmup_epochs=2",
)
FROM_CROPS = variant(  # no teacher's pass: CNN_l's scores of its own training crops teach
    "navigator, teacher from CNN_l's training crops, one crop per image",
    "localizer.teacher_from=crops",
    "localizer.train_crops=1",
)
FROM_CROPS2 = variant(
    "navigator, teacher from CNN_l's training crops, two crops per image",
    "localizer.teacher_from=crops",
    "localizer.train_crops=2",
)
FROM_MAPS = variant(  # the same crops; every anchor they show teaches, from their maps' cells
    "navigator, teacher from the cells of CNN_l's training crops, one crop per image",
    "localizer.teacher_from=maps",
    "localizer.train_crops=1",
)
FROM_MAPS_WIDE = variant(  # ... and every anchor they show a quarter of
    "navigator, teacher from the cells of CNN_l's training crops (anchors a quarter shown), "
    "one crop per image",
    *FROM_MAPS.stage2[1:],
    "localizer.teacher_seen=0.25",
)
FROM_MAPS2 = variant(
    "navigator, teacher from the cells of CNN_l's training crops, two crops per image",
    "localizer.teacher_from=maps",
    "localizer.train_crops=2",
)
# CNN_l trains on one crop per image and looks at the other of the two, without gradients: the
# teacher reads FROM_MAPS2's crops at one crop's backward (and a second forward)
FROM_MAPS_LOOKS = variant(
    "navigator, teacher from the cells of CNN_l's training crop and of the other crop it looks at, "
    "one crop per image",
    *FROM_MAPS.stage2[1:],
    "localizer.teacher_crops=2",
)
FROM_CROPS_LOOKS = variant(
    "navigator, teacher from CNN_l's training crop and the other crop it looks at, one crop per "
    "image",
    *FROM_CROPS.stage2[1:],
    "localizer.teacher_crops=2",
)
# two training crops, the drawn one read at 0.7 of CNN_l's side (about half its pixels)
FROM_MAPS2_SMALL = variant(
    "navigator, teacher from the cells of CNN_l's training crops, two crops per image, the drawn "
    "one at 0.7 of the side",
    *FROM_MAPS2.stage2[1:],
    "localizer.drawn_scale=0.7",
)
FROM_MAPS_OWN = variant(  # the navigator's choice in every image: no drawn crops
    "navigator, teacher from the cells of CNN_l's training crops, its choice in every image",
    *FROM_MAPS.stage2[1:],
    "localizer.drawn_every=0",
)
LONG = ("trainer.max_epochs=10", "model.scheduler.milestones=[6]")  # lr / 10 after 6
FROM_CROPS_LONG = variant(  # as many CNN_l crops as the shipped navigator's 5 epochs at 2 per image
    "navigator, teacher from CNN_l's training crops, one crop per image, 10 epochs (lr / 10 after 6)",
    *FROM_CROPS.stage2[1:],
    *LONG,
)
FROM_MAPS_LONG = variant(  # the maps teacher at the same doubled schedule
    "navigator, teacher from the cells of CNN_l's training crops, one crop per image, 10 epochs "
    "(lr / 10 after 6)",
    *FROM_MAPS.stage2[1:],
    *LONG,
)
# FROM_CROPS_LONG's schedule for the shipped one: is it as good as the shipped one at 10 epochs?
SHIPPED_LONG = variant("navigator as shipped, 10 epochs (lr / 10 after 6)", *LONG)
# the variants by the key `--rows` names them with, in the report's order
ROWS = {
    "teacher-at-crops-scale": CHEAP,
    "taught": TAUGHT,
    "one-crop": ONE_CROP,
    "taught-warm": TAUGHT_WARM,
    "crops": FROM_CROPS,
    "crops2": FROM_CROPS2,
    "crops-long": FROM_CROPS_LONG,
    "maps": FROM_MAPS,
    "maps-wide": FROM_MAPS_WIDE,
    "maps-own": FROM_MAPS_OWN,
    "maps2": FROM_MAPS2,
    "maps-long": FROM_MAPS_LONG,
    "maps-looks": FROM_MAPS_LOOKS,
    "crops-looks": FROM_CROPS_LOOKS,
    "maps2-small": FROM_MAPS2_SMALL,
}
CHEAPER = tuple(ROWS.values())
# run after the first table's stage 1 was gone: in the second table only
# (experiments/localizers/navigator-cost-2/)
SECOND = ("maps-looks", "crops-looks", "maps2-small")
# also paired with the shipped one at the schedule they share
SAME_SCHEDULE = ((FROM_CROPS_LONG, SHIPPED_LONG), (FROM_MAPS_LONG, SHIPPED_LONG))

"""The localizer study's rows and regimes: what each row trains, and which runs each regime holds.

A row is a stage-1 run (a global CNN) or a stage-2 run on the input-size stage-1 run of the same
seed, named by its overrides; the same overrides are the same run, shared by the rows that need
it. A regime is a setting of the synthetic generator (`data.synthetic.cue`, `decoys`,
`attribute`); each seed draws its own data as well as its own initialisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from experiments.localizers.stats import mean

INPUT, SOURCE, MATCHED = 80, 160, 113  # CNN input, source, and the side whose FLOPs match KALM's
QUICK_INPUT, QUICK_SOURCE, QUICK_MATCHED = 64, 128, 90
# Every stage-2 row (navigator warm-up included) trains 5 epochs at batch 8, the preset's stage 1
# 4 epochs at 32: a navigator learning from scratch needs about 200 steps (chosen on a hold-out of
# train, never on valid: experiments/localizers/RESULTS.md), which batch 8 gives in 4 epochs.
STAGE2 = ("trainer.max_epochs=5", "data.batch_size=8")

# The study's navigators are taught by p_l(image's label | anchor): with p(abnormal), the issue's
# teacher, a normal image's decoy blob is where the navigator is sent away from, an abnormal
# image's lesion blob where it is sent to, and a view that cannot tell them apart learns neither
# (hold-out of train, seed 0: the scout on the view hit 18% of held-out lesions with p(abnormal),
# 79% with p(label)). The p(abnormal) navigators stay as an ablation (ABLATIONS).
NAVIGATOR = ("localizer=navigator", "localizer.teacher_score=label")
# The navigator's options as this study ran them, conf/localizer/navigator.yaml's defaults then: 5x5
# anchors of half 0.5, a head on CNN_g's map, taught by p(abnormal), and (for reads=view|source)
# the GroupNorm scout. The config now defaults to the variant the study found best and to the
# local scout (study 3); every run of this study starts its navigator from these instead
# (`pinned`), so each row's overrides, and its records' names, mean what they did.
NAVIGATOR_THEN = (
    "localizer.grid=5",
    "localizer.half=0.5",
    "localizer.reads=map",
    "localizer.teacher_score=abnormal",
    "localizer.scout=group",
)


def pinned(overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The overrides with the study's navigator defaults right after `localizer=navigator`."""
    out: list[str] = []
    for override in overrides:
        out += [override, *(NAVIGATOR_THEN if override == "localizer=navigator" else ())]
    return tuple(out)


@dataclass(frozen=True)
class Row:
    name: str
    score: str  # which of the run's scores the row reports: global or kalm
    stage1: tuple[str, ...] = ()  # overrides of the stage-1 run
    stage2: tuple[str, ...] | None = None  # overrides of the stage-2 run; None: a stage-1 row
    inference: str | None = None  # "mil": the stage-2 run's checkpoint scored over every anchor
    kind: str = "baseline"  # baseline | paper | control | learned (new) | ceiling | ablation
    seeds: int | None = None  # a fixed number of seeds (an ablation); None: the regime's rule

    @property
    def learned(self) -> bool:
        return self.kind == "learned"


def quick(overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The same overrides at --quick's sizes."""
    sizes = {str(INPUT): QUICK_INPUT, str(SOURCE): QUICK_SOURCE, str(MATCHED): QUICK_MATCHED}
    return tuple(re.sub(r"=(\d+)$", lambda m: f"={sizes.get(m[1], m[1])}", o) for o in overrides)


GLOBAL_INPUT = Row(f"global CNN @ input ({INPUT} px)", "global")
GLOBAL_SOURCE = Row(f"global CNN @ source ({SOURCE} px)", "global", (f"data.image_size={SOURCE}",))
GLOBAL_MATCHED = Row(
    f"global CNN, cost-matched ({MATCHED} px)", "global", (f"data.image_size={MATCHED}",)
)
PAPER = Row("KALM (paper)", "kalm", (), ("localizer=kalm",), kind="paper")
CAM = Row("KALM, CAM aggregation", "kalm", (), ("localizer=kalm", "localizer.aggregation=cam"))
NAV_MAP = Row(
    "navigator on CNN_g's map", "kalm", (), (*NAVIGATOR, "localizer.reads=map"), kind="learned"
)
NAV_VIEW = Row(
    "navigator, scout on the view", "kalm", (), (*NAVIGATOR, "localizer.reads=view"), kind="learned"
)
NAV_SOURCE = Row(
    "navigator, scout on the source",
    "kalm",
    (),
    (*NAVIGATOR, "localizer.reads=source"),
    kind="learned",
)
# The scout on the source sees the texture itself, so it can centre a smaller box: 6 x 6 anchors of
# half-extent 0.4 (16% of the image) held 93% of the hold-out's lesion centres at IoU 0.43 on seed
# 0, against 88% at IoU 0.28 for the 5 x 5 of half-extent 0.5 (the scout on the view lost hits
# with smaller anchors: discussion.md). A variant of its own, chosen by the same hold-out rule.
FINE = ("localizer.grid=6", "localizer.half=0.4")
NAV_SOURCE_FINE = Row(
    "navigator, scout on the source, 6x6 anchors of half 0.4",
    "kalm",
    (),
    (*NAVIGATOR, "localizer.reads=source", *FINE),
    kind="learned",
)
READS = {
    NAV_MAP.name: "map",
    NAV_VIEW.name: "view",
    NAV_SOURCE.name: "source",
    NAV_SOURCE_FINE.name: "source, 6x6 of half 0.4",
}


def reinforce_of(best: Row) -> Row:
    """The REINFORCE refinement of the best navigator (its reads), started from its distillation."""
    reads = READS[best.name]
    return Row(
        f"navigator ({reads}) + REINFORCE",
        "kalm",
        (),
        (*best.stage2, "localizer.policy=reinforce"),
        kind="learned",
    )


def mil_of(best: Row) -> Row:
    """The MIL ceiling on the best navigator's run: every anchor scored, the max kept."""
    return Row(
        f"MIL ceiling: every anchor, max ({READS[best.name]} run)",
        "kalm",
        (),
        best.stage2,
        inference="mil",
        kind="ceiling",
    )


ABLATIONS = [  # the teacher, p_l(abnormal | anchor), on the main regime's first seeds
    Row(
        f"ablation: navigator ({reads}), teacher p(abnormal)",
        "kalm",
        (),
        ("localizer=navigator", f"localizer.reads={reads}"),
        kind="ablation",
        seeds=2,
    )
    for reads in ("map", "view", "source")
]

FULL = Row("control: whole image", "kalm", (), ("localizer=full",), kind="control")
FIXED = Row("control: fixed centred box", "kalm", (), ("localizer=fixed",), kind="control")
RANDOM = Row("control: random anchor", "kalm", (), ("localizer=random",), kind="control")

BASELINES = [GLOBAL_INPUT, GLOBAL_SOURCE, GLOBAL_MATCHED, PAPER, CAM]
CONTROLS = [FULL, FIXED, RANDOM]
# where the navigator reads from (and the source's finer anchors): chosen in the main regime
NAVIGATORS = [NAV_MAP, NAV_VIEW, NAV_SOURCE, NAV_SOURCE_FINE]
# What a one-crop localizer must beat in the main regime (the goal), by the spreads added.
MUST_BEAT = [GLOBAL_INPUT, GLOBAL_MATCHED, FULL, FIXED, RANDOM]
# The rows the main regime's conclusions rest on, with 5 seeds (the others 3): the goal's
# comparisons, the source-size ceiling, the paper's KALM and the best navigator.
KEY = (GLOBAL_INPUT, GLOBAL_SOURCE, GLOBAL_MATCHED, PAPER, *CONTROLS)


@dataclass(frozen=True)
class Regime:
    name: str  # a file-name-safe key
    label: str
    cue: float
    decoys: int = 0
    attribute: float = 0.0
    main: bool = False  # the regime of the goal: every navigator variant, 5 seeds for KEY rows
    sweep: bool = False  # a point of the sweep of c: the reduced rows

    def rows(self, best: Row) -> list[Row]:
        """This regime's rows, given the best navigator (chosen on the main regime's hold-out)."""
        if self.sweep:
            return [GLOBAL_INPUT, GLOBAL_SOURCE, PAPER, best, FIXED]
        navigators = NAVIGATORS if self.main else [best]
        ablations = ABLATIONS if self.main else []
        return [*BASELINES, *navigators, reinforce_of(best), mil_of(best), *CONTROLS, *ablations]

    def overrides(self) -> tuple[str, ...]:
        return (
            f"data.synthetic.cue={self.cue}",
            f"data.synthetic.decoys={self.decoys}",
            f"data.synthetic.attribute={self.attribute}",
        )


REGIMES = [
    Regime("c0", "c = 0: nothing to find at the input size", 0.0),
    Regime(
        "c0.5", "c = 0.5, D = 0: found at the input size, decided at the source", 0.5, main=True
    ),
    Regime("c0.5-d3-a0.3", "c = 0.5, D = 3, lesion blob 30% brighter", 0.5, 3, 0.3),
]


SWEEP_CUES = (0.0, 0.2, 0.5, 1.0)  # 0 and 0.5 are the full regimes' runs, read back


def run_name(row: Row) -> str:
    """A run's one name, in the study's folders and records: its overrides (the same overrides are
    the same run), then its inference where it has one (the MIL ceiling of a trained run)."""
    if row.stage2 is None:
        name = "-".join(["s1", *row.stage1])
    else:
        name = "-".join(["s2", *row.stage1, *row.stage2])
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace("=", "-"))
    return f"{name}-{row.inference}" if row.inference else name


Plan = list[tuple[Regime, Row, int]]


def seeds_of(regime: Regime, row: Row, best: Row, quick: bool) -> list[int]:
    """5 seeds for the rows the main regime's conclusions rest on, 3 for the others."""
    if quick:
        return [0]
    if row.seeds is not None:
        return list(range(row.seeds))
    key = regime.main and (row in KEY or row in (best, mil_of(best)))
    return list(range(5 if key else 3))


def cues(quick: bool) -> tuple[float, ...]:
    return (0.5, 1.0) if quick else SWEEP_CUES  # --quick: the main regime and one more c


def main_regime() -> Regime:
    return next(r for r in REGIMES if r.main)


def regimes_of(quick: bool) -> list[Regime]:
    """The main regime first: the goal is judged there; --quick runs it alone."""
    ordered = sorted(REGIMES, key=lambda r: not r.main)
    return ordered[:1] if quick else ordered


def sweep_regime(cue: float) -> Regime:
    known = {r.cue: r for r in REGIMES if not r.decoys and not r.attribute}
    name = known[cue].name if cue in known else f"c{cue:g}"
    return Regime(name, f"c = {cue:g}, D = 0", cue, sweep=True)


def best_navigator(study, quick: bool) -> Row:
    """Where the navigator reads from: the variant whose boxes hold the most lesion centres of
    the hold-out of train (never valid), then the best hold-out AUROC, over the main regime's
    first seeds. The hit rate comes first: the study asks which localizer finds the key area,
    and the hold-out AUROC of the navigators reaches 1.0 on some seeds, where it cannot choose."""
    scored = []
    for row in NAVIGATORS:
        runs = [study.read(main_regime(), row, s) for s in ([0] if quick else range(3))]
        runs = [r for r in runs if r is not None]
        if runs:
            hits = [(r.get("heldout_localization") or {}).get("hit_rate", 0.0) for r in runs]
            scored.append((mean(hits), mean([r["heldout"] for r in runs]), row.name, row))
    return max(scored)[-1] if scored else NAVIGATORS[1]


def planned(regime: Regime, rows: list[Row], best: Row, quick: bool) -> Plan:
    """The regime's runs of these rows, seed by seed: each seed's whole row set comes early."""
    runs = [(regime, row, s) for row in rows for s in seeds_of(regime, row, best, quick)]
    return sorted(runs, key=lambda run: run[2])


def everything(best: Row, quick: bool) -> Plan:
    """Every run of the study, in the order they run. First the main regime's rows that decide
    which navigator is best (every variant, the baselines and controls), seed by seed; then the
    runs that depend on it (its refinement, its MIL ceiling, its further seeds); then the other
    regimes and the sweep of c with it, seed by seed across them: a part that stops early leaves
    one seed of every regime and point of c rather than every seed of the first."""
    main = main_regime()
    deciding = [*BASELINES, *NAVIGATORS, *CONTROLS]
    plan = planned(main, deciding, best, quick) + planned(main, main.rows(best), best, quick)
    rest: Plan = []
    for regime in [*regimes_of(quick)[1:], *(sweep_regime(c) for c in cues(quick))]:
        rest += planned(regime, regime.rows(best), best, quick)
    plan += sorted(rest, key=lambda run: run[2])  # stable: regime order within a seed
    # one run per record: a point of the sweep that is a regime of its own (c = 0, c = 0.5) shares
    # its records, and its runs are planned once
    once: dict[tuple[str, Row, int], tuple[Regime, Row, int]] = {}
    for regime, row, seed in plan:
        once.setdefault((regime.name, row, seed), (regime, row, seed))
    return list(once.values())


def collect(study, regime: Regime, best: Row, quick: bool) -> dict[str, list[dict]]:
    records = {}
    for row in regime.rows(best):
        runs = [study.read(regime, row, s) for s in seeds_of(regime, row, best, quick)]
        records[row.name] = [r for r in runs if r is not None]
    return records

"""How a search searches, defined once: `SearchPlan`'s fields make `--search`'s flags and
`amp_magics.search`'s keywords, as TrainOptions' make the training ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..training.options import DIAGNOSIS, option

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "percentile", "hyperband", "none")


@dataclass(frozen=True)
class SearchPlan:
    """What to search and how: the space, how many trials, the sampler, the pruner, the
    objective, and where the study is kept."""

    space: Any = option(
        help="search beyond grids (Optuna): KEY=log(a,b) | uniform(a,b) | int(a,b) | a,b,c; ...",
        group=DIAGNOSIS, flag="--search", metavar="SPEC", legend=False,
        doc='search the space, e.g. `"lr=log(1e-5,1e-1); weight_decay=0,1e-4; '
            'clip=uniform(0.5,5)"`: `log(a,b)` log-uniform, `uniform(a,b)`, `int(a,b)`, or a '
            "list to choose from; keys as `--sweep`. Built on Optuna (`pip install "
            '"amp_magics[search]"`); every trial starts from the same state and trains as '
            "`--sweep` would with its values (see \"Search\" below)")
    trials: int = option(
        20, help="with --search: trials to finish, complete or pruned (default 20)",
        group=DIAGNOSIS, metavar="N",
        doc="with `--search`: finished trials (complete or pruned) the study should have; a "
            "trial that failed or was interrupted does not count (default 20)")
    sampler: str = option(
        "tpe", help="with --search: how the values are picked (default tpe)", group=DIAGNOSIS,
        choices=SAMPLERS,
        doc="with `--search`: Optuna's sampler: TPE (default), random, grid (lists only), "
            "CMA-ES (needs `cmaes`); seeded by `--seed`")
    prune: str = option(
        "median", help="with --search: how hopeless trials are stopped (default median)",
        group=DIAGNOSIS, choices=PRUNERS,
        doc="with `--search`: the pruner, patient (a trial is stopped after 2 hopeless "
            "reports in a row); median and percentile prune after 5 trials and a warm-up of 2 "
            "reports, hyperband halves from 2 reports' steps with no startup trials (default "
            "median)")
    direction: str = option(
        "minimize", help="with --search: minimize (default) or maximize the objective",
        group=DIAGNOSIS, choices=("minimize", "maximize"),
        doc="with `--search`: `minimize` (default) or `maximize` the objective")
    objective: Optional[str] = option(
        None, help="with --search: a --log name to optimise, smoothed (default: the loss)",
        group=DIAGNOSIS, metavar="NAME",
        doc="with `--search`: a `--log` name to optimise, smoothed, e.g. `acc` with "
            "`--direction maximize` (default: the validation loss with `--val`, else the "
            "smoothed train loss). Not with `--val`: the validation pass computes only the "
            "loss")
    report_every: Optional[int] = option(
        None, help="with --search: optimizer steps between reports to the pruner (default a "
                   "tenth of a trial)", group=DIAGNOSIS, metavar="N",
        doc="with `--search`: optimizer steps between reports to the pruner, never from a "
            "skipped step (default: a tenth of a trial). With `--val` the reports are the "
            "validation losses at epoch ends and N sets only the warm-up (2 N steps)")
    study: Optional[str] = option(
        None, help="with --search: keep the study in STUDY_DIR/NAME.journal; a re-run "
                   "continues it", group=DIAGNOSIS, metavar="NAME",
        doc="with `--search`: keep the study in an Optuna journal file, "
            "`AmpMagics.study_dir/NAME.journal` (default folder `amp_studies`); running the "
            "cell again continues it")
    study_dir: str = option(
        "amp_studies", help="the folder of the studies' journal files", group=DIAGNOSIS,
        flag=None)
    keep: str = option(
        "start", help="after --sweep or --search: restore the start (default) or keep the "
                      "best run's weights", group=DIAGNOSIS, choices=("start", "best"),
        doc="after a sweep or a search, restore the starting state (default) or keep the best "
            "run's weights (a search's best by its objective; a sweep's by val loss with "
            "`--val`, else final train loss)")

"""How bench/gpu.py fits its items into one wall-clock budget: pure functions, no torch.

Every item states its work in units that calibration prices (seconds per unit, measured on
the machine in the run's first seconds):

    est_seconds(scale) = SAFETY * (fixed_s + priced(fixed_units) + scale * priced(units))
    priced(units)      = sum(amount * rates[rate] for rate, amount in units.items())

`fixed_s` is what no shortening removes (starting Python and torch, loading the model,
compiling), `fixed_units` work that does not shrink with the recipe (the final sampled
evaluation), `units` the work that does (teacher lists, student steps, measurements), at
the full recipe (scale 1). Rate names are "kind@batch", e.g. "vector_step@8": the seconds of
one vector-student step at batch 8 (calibrate() in bench/gpu.py measures each one named).

Shares: the time left is dealt out among the items not yet run in proportion to their
weights (share_of), so the shares never add up to more than the budget, time an item did
not use flows on to the later ones, and an item that overran leaves the later ones exactly
the time that is left. fit() then runs an item whole, shortens it (a smaller scale, never
below its stated minimum) or skips it with the reason: never started blind.
"""
import math
from dataclasses import dataclass, field

SAFETY = 1.25  # estimates are rough (a linear model of a few timed steps): keep a margin


@dataclass
class Item:
    name: str
    weight: float                 # its share of the budget, relative to the other items
    units: dict                   # {rate: amount} at the full recipe; shrinks with scale
    fixed_s: float = 0.0          # seconds that do not shrink (start-up, loading, compiling)
    fixed_units: dict = field(default_factory=dict)  # priced work that does not shrink
    min_scale: float = 0.1        # the smallest share of the recipe worth running
    kind: str = "subprocess"      # "bench" (in this process) or "subprocess" (a command)
    spec: dict = field(default_factory=dict)  # how to run it (gpu_items.py)


@dataclass
class Decision:
    status: str        # ok, shortened or skipped
    scale: float       # the share of the recipe it runs (0 when skipped)
    est_s: float       # the estimated seconds at that scale
    share_s: float     # the seconds it was given
    reason: str = ""


def priced(units, rates):
    """Seconds for `units` ({rate: amount}) at `rates` ({rate: seconds per unit})."""
    missing = [r for r in units if r not in rates]
    if missing:
        raise KeyError(f"no measured rate for {', '.join(missing)}")
    return sum(amount * rates[rate] for rate, amount in units.items())


def est_seconds(item, rates, scale=1.0):
    """The item's estimated seconds at `scale` of its recipe (the formula above)."""
    fixed = item.fixed_s + priced(item.fixed_units, rates)
    return SAFETY * (fixed + scale * priced(item.units, rates))


def share_of(items, index, time_left):
    """Item `index`'s share of time_left: its weight over the weights of items[index:]."""
    rest = sum(i.weight for i in items[index:])
    return max(0.0, time_left) * items[index].weight / rest if rest > 0 else 0.0


def fit(item, share_s, rates):
    """Run whole if it fits its share; else the largest scale that does (two significant
    digits, rounded down), if that is at least item.min_scale; else skip, saying why."""
    full = est_seconds(item, rates, 1.0)
    if full <= share_s:
        return Decision("ok", 1.0, round(full, 1), round(share_s, 1))
    fixed = est_seconds(item, rates, 0.0)
    variable = full - fixed
    raw = (share_s - fixed) / variable if variable > 0 else 0.0
    scale = max(round_down(raw), item.min_scale) if raw >= item.min_scale else 0.0
    if variable > 0 and scale >= item.min_scale:
        return Decision("shortened", scale, round(est_seconds(item, rates, scale), 1),
                        round(share_s, 1), f"the full recipe needs ~{full:.0f} s")
    need = est_seconds(item, rates, item.min_scale if variable > 0 else 1.0)
    return Decision("skipped", 0.0, round(need, 1), round(share_s, 1),
                    f"needs ~{need:.0f} s even at {item.min_scale:.0%} of its recipe; "
                    f"its share is {share_s:.0f} s")


def round_down(x):
    """x > 0 rounded down to two significant digits (0.4567 -> 0.45); 0 for x <= 0."""
    if x <= 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(x)) - 1)  # one in the second significant digit
    return round(math.floor(x / unit * (1 + 1e-12)) * unit, 12)


def plan(items, time_left, rates):
    """The decisions made up front, as if every item took exactly its estimate: what
    plan.json records. The run re-decides each item with the time actually left."""
    decisions = []
    for i, item in enumerate(items):
        d = fit(item, share_of(items, i, time_left), rates)
        decisions.append(d)
        time_left -= d.est_s if d.status != "skipped" else 0.0
    return decisions


def scaled(n, scale, minimum=1):
    """A count of the recipe (steps, samples) at `scale`, at least `minimum`."""
    return max(minimum, round(n * scale))

"""What each part of a run needs of the others, and what it takes away: the source of compatibility.

Every component that shapes a model update or what leaves a hospital (a task, a strategy, a step
on an update's way out of a hospital or into the aggregate, an extra model, an explanation)
declares itself as a `Declaration`: the setting that turns it on, the facts it needs to hold, and
the facts it breaks, each with the reason in its own words. Two settings cannot run together when
one breaks a fact the other needs; the refusal names both settings and both reasons. Nothing else
decides what combines: a new component declares itself and every pairing with it follows.

Facts are plain strings, so a study's own component can declare with them (or with new ones of its
own) without importing more than this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedward.errors import ConfigError

# The facts, each as it holds in a run where nothing breaks it.
CLEAR = "each hospital's change reaches the driver in the clear, whole and in its own values"
WHOLE_SHAPE = "every hospital's change has the global model's shape"
MEAN = "the aggregate is the weighted mean of the changes"
SAME_ROUND = "a change counts only in the round it was trained for"
ACCOUNTED = "every model whose figures or values leave a hospital is trained inside the DP mechanism"
PLAIN_EPOCHS = "a hospital's local training is plain epochs over its training split, nothing more"
PLAIN_SGD = "local steps are plain SGD without momentum"
SAMPLES_APART = "each sample's gradient is computed apart from the others in its batch"
EVERY_LAYER_SUMMED = "no layer of a change leaves the hospital except inside the protected sum"
LAYERS_APART = "a layer's change reveals nothing of another layer's"
CONTROL_CHANGES = "each change is aggregated together with the control change it carries"
DRIVER_TRAINS_FREELY = "the driver may train on its own trusted data outside any privacy budget"
ONE_SCORE = "the model gives one probability per patient (a binary task)"


@dataclass(frozen=True)
class Declaration:
    """A component as the compatibility check sees it.

    `setting` is how the config turns it on ("privacy.masking", "strategy.name: scaffold");
    `needs` and `breaks` map a fact to the component's reason for needing or breaking it.
    """

    setting: str
    needs: Mapping[str, str] = field(default_factory=dict)
    breaks: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Conflict:
    needing: Declaration
    breaking: Declaration
    fact: str

    def __str__(self) -> str:
        a, b = self.needing, self.breaking
        return f"{a.setting} cannot run with {b.setting}: {a.setting} {a.needs[self.fact]}, but {b.setting} {b.breaks[self.fact]}"


def conflicts(declarations: Iterable[Declaration]) -> list[Conflict]:
    """Every pair of declarations where one breaks what the other needs, in the order given."""
    active = list(declarations)
    return [
        Conflict(a, b, fact)
        for a in active
        for b in active
        if a is not b
        for fact in a.needs
        if fact in b.breaks
    ]


def require_compatible(declarations: Iterable[Declaration]) -> None:
    """Refuse the first conflict, naming both settings (all of them when there are several)."""
    found = conflicts(declarations)
    if found:
        more = "" if len(found) == 1 else "; also " + "; ".join(str(c) for c in found[1:])
        raise ConfigError(f"{found[0]}{more}")

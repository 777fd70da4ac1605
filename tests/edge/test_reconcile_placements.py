"""The reconciler hands each applied desired state's placements to the placement book (kept on
disk), and replay protection covers them: the same generation with other placements is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefed.common.schemas import DesiredState, Placement
from edgefed.common.serving.service import ModelTable
from edgefed.edge.placements import PlacementBook
from edgefed.edge.reconcile import ModelEvent, Reconciler
from edgefed.edge.store import ModelStore

SPLIT = Placement(mode="split", split_point=1, pool="gpu", expected_ms=12)
CLOUD = Placement(mode="cloud", pool="gpu")


def _no_network(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the agent used the network")


def reconciler(state_dir: Path, book: PlacementBook) -> Reconciler[Any]:
    events: list[ModelEvent] = []
    return Reconciler(
        store=ModelStore(state_dir),
        table=ModelTable(),
        loader=_no_network,
        fetch=_no_network,
        report=events.append,
        trusted_keys=[],
        placements=book,
    )


def state(generation: int, **placements: Placement) -> DesiredState:
    return DesiredState(agent_id="a1", generation=generation, placements=placements)


async def test_placements_of_an_applied_state_are_in_force_and_on_disk(tmp_path: Path) -> None:
    book = PlacementBook(tmp_path)
    rec = reconciler(tmp_path, book)

    await rec.apply(state(1, m=SPLIT))
    await rec.apply(state(2, m=CLOUD))

    assert book.current == {"m": CLOUD}
    assert PlacementBook(tmp_path).load() == {"m": CLOUD}


async def test_the_same_generation_with_other_placements_is_a_replay_and_changes_nothing(
    tmp_path: Path,
) -> None:
    book = PlacementBook(tmp_path)
    rec = reconciler(tmp_path, book)
    await rec.apply(state(3, m=SPLIT))

    await rec.apply(state(3, m=CLOUD))
    await rec.apply(state(3, m=SPLIT))  # the retained state delivered again: accepted quietly

    assert book.current == {"m": SPLIT}

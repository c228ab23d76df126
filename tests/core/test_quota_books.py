"""OrgBooks answers "in quota?" from what it remembers exactly as it would from the books."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from scheduler.core.quota import OrgBooks
from scheduler.core.types import Snapshot
from tests.core.test_properties import SETTINGS, TYPES, snapshots


def in_quota_from_the_books(books: OrgBooks, org_id: int, gpu_type: str, gpus: int) -> bool:
    """The definition (docs/SCHEDULING.md section 4), read from the allocations as they are."""
    for a in books.path[org_id]:
        g = books.orgs[a].guaranteed.get(gpu_type, 0)
        if a != org_id and g <= 0:
            continue  # an ancestor without a guarantee for the type does not bound it
        if books.alloc[a].get(gpu_type, 0) + gpus > g:
            return False
    return True


@SETTINGS
@given(
    snapshots(),
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 10), st.sampled_from(TYPES), st.integers(1, 9)),
        min_size=1,
        max_size=40,
    ),
)
def test_in_quota_matches_the_books_through_a_cycle_of_starts(
    snap: Snapshot, steps: list[tuple[bool, int, str, int]]
) -> None:
    books = OrgBooks(snap.orgs, dict.fromkeys(TYPES, 64))
    ids = sorted(books.orgs)
    for start, pick, gpu_type, gpus in steps:
        org_id = ids[pick % len(ids)]
        if start:
            books.add(org_id, gpu_type, gpus)  # a start: allocations only grow in a cycle
        else:
            expected = in_quota_from_the_books(books, org_id, gpu_type, gpus)
            assert books.in_quota(org_id, gpu_type, gpus) == expected
        # Every size, largest first: a size out of quota must not stop a smaller one that fits.
        for size in range(12, 0, -1):
            expected = in_quota_from_the_books(books, org_id, gpu_type, size)
            assert books.in_quota(org_id, gpu_type, size) == expected

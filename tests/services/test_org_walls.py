"""The tenant wall's rule (scheduler/services/orgs.py `full_view_ids`) on random org trees:
an org below the caller's is seen in full exactly when no tenant stands between them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from scheduler.db import Org
from scheduler.services.orgs import full_view_ids, subtree_ids


@st.composite
def forests(draw: st.DrawFn) -> list[Org]:
    """Orgs 1..n, each under an earlier one or a root; each a tenant or a group."""
    size = draw(st.integers(min_value=1, max_value=24))
    orgs = []
    for oid in range(1, size + 1):
        parent = (
            draw(st.one_of(st.none(), st.integers(min_value=1, max_value=oid - 1)))
            if oid > 1
            else None
        )
        orgs.append(Org(id=oid, name=f"org{oid}", parent_id=parent, tenant=draw(st.booleans())))
    return orgs


def _walled_between(by_id: dict[int, Org], root: int, org: int) -> bool:
    """Whether an org on the way up from `org` to `root` (itself included, `root` not) is a
    tenant of its own."""
    while org != root:
        if by_id[org].tenant:
            return True
        parent = by_id[org].parent_id
        assert parent is not None
        org = parent
    return False


@given(forests(), st.data())
def test_an_org_is_seen_in_full_exactly_when_no_tenant_stands_between(
    orgs: list[Org], data: st.DataObject
) -> None:
    by_id = {o.id: o for o in orgs}
    root = data.draw(st.sampled_from(sorted(by_id)))
    below = subtree_ids(orgs, root)
    full = full_view_ids(orgs, root)
    assert root in full
    assert full <= below
    for org in below - {root}:
        assert (org in full) == (not _walled_between(by_id, root, org))


@given(forests(), st.data())
def test_raising_a_wall_never_shows_more(orgs: list[Org], data: st.DataObject) -> None:
    root = data.draw(st.sampled_from([o.id for o in orgs]))
    before = full_view_ids(orgs, root)
    groups = [o for o in orgs if not o.tenant]
    if not groups:
        return
    walled = data.draw(st.sampled_from(groups))
    walled.tenant = True
    after = full_view_ids(orgs, root)
    assert after <= before
    if walled.id in subtree_ids(orgs, root) - {root}:  # below the caller: hides all behind it
        assert not subtree_ids(orgs, walled.id) & after
    else:  # the caller's own org, above it or beside it: its view is as it was
        assert after == before

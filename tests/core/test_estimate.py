"""Release profiles answer exactly as the step-by-step builder they replaced did."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.estimate import Profile


def reference_start(
    now: float, free_now: int, releases: list[tuple[float, int]], work: float, gpus: int
) -> float | None:
    """The original builder: one step per distinct time, releases due by now in the first."""
    times, levels, cum = [now], [free_now], [0.0]
    for t, g in sorted(releases):
        if t <= times[-1]:
            levels[-1] += g
            continue
        cum.append(cum[-1] + levels[-1] * (t - times[-1]))
        times.append(t)
        levels.append(levels[-1] + g)
    j = next((i for i, level in enumerate(levels) if level >= gpus), None)
    if j is None:
        return None
    if work <= 0:
        return times[j]
    i = next((x for x, c in enumerate(cum) if c >= work), len(cum))
    if i == len(cum):
        if levels[-1] <= 0:
            return None
        t_work = times[-1] + (work - cum[-1]) / levels[-1]
    else:
        t_work = times[i - 1] + (work - cum[i - 1]) / levels[i - 1]
    return max(times[j], t_work)


times = st.sampled_from([-50.0, 0.0, 0.0, 10.0, 10.0, 20.0, 35.5, 1e5]) | st.floats(0, 1000)


@settings(max_examples=300, deadline=None)
@given(
    now=st.sampled_from([0.0, 100.0]),
    free_now=st.integers(0, 10),
    releases=st.lists(st.tuples(times, st.sampled_from([0, 1, 2, 8])), max_size=30),
    queries=st.lists(
        st.tuples(st.sampled_from([0.0, 10.0, 50.0]) | st.floats(0, 1e7), st.integers(0, 40)),
        min_size=1,
        max_size=10,
    ),
)
def test_profile_matches_the_step_by_step_builder(
    now: float,
    free_now: int,
    releases: list[tuple[float, int]],
    queries: list[tuple[float, int]],
) -> None:
    prof = Profile(now, free_now, [(now + t, g) for t, g in releases])
    shifted = [(now + t, g) for t, g in releases]
    for work, gpus in queries:
        assert prof.start_for(work, gpus) == reference_start(now, free_now, shifted, work, gpus)

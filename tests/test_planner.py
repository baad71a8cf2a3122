"""Clip planner (spec 1.10): invariants over every clip length 1..1200, and the clean reference lengths."""

import pytest

from keyface.planner import (
    IDENTITY,
    KEYFRAME,
    PAD,
    STEP,
    WINDOW,
    PlanError,
    video_frame_count,
    plan_clip,
)

ALL_N = range(1, 1201)


def check_plan(n):
    p = plan_clip(n)
    assert p.num_frames == n
    last = n - 1

    # keyframes: 13 j, the last one at or past the last frame, at least two
    K = p.num_keyframes
    assert K >= 2
    assert p.keyframe_frames == tuple(STEP * j for j in range(K))
    assert p.keyframe_frames[-1] >= last
    assert p.keyframe_frames[-2] < last or n == 1  # no keyframe beyond the one that is needed
    assert p.keyframe_rows == tuple(min(k, last) for k in p.keyframe_frames)
    assert p.padded_rows == p.keyframe_frames[-1] + 1 - n >= 0

    # batches: 14 slots, identity first (frame-0 audio), every keyframe exactly once, in order,
    # pads only at the end of the last batch and repeating the last real slot's row
    seen = []
    for b, batch in enumerate(p.batches):
        assert len(batch) == WINDOW
        assert batch[0].kind == IDENTITY and batch[0].audio_row == 0 and batch[0].keyframe_index is None
        kinds = [s.kind for s in batch[1:]]
        assert IDENTITY not in kinds
        real = [s for s in batch[1:] if s.kind == KEYFRAME]
        assert real, "a batch without a keyframe"
        assert kinds == [KEYFRAME] * len(real) + [PAD] * (WINDOW - 1 - len(real))
        if b < p.num_batches - 1:
            assert len(real) == WINDOW - 1
        for s in real:
            assert s.audio_row == p.keyframe_rows[s.keyframe_index]
            seen.append(s.keyframe_index)
        for s in batch[1 + len(real):]:
            assert s.audio_row == real[-1].audio_row and s.keyframe_index is None
        assert p.batch_keyframes(b) == [(i + 1, s.keyframe_index) for i, s in enumerate(real)]
    assert seen == list(range(K))
    assert p.num_batches == -(-K // (WINDOW - 1))

    # segments: consecutive real keyframe pairs, 14 frames, audio row = frame (clamped)
    assert p.num_segments == K - 1
    for j, s in enumerate(p.segments):
        assert s.index == j and s.start_keyframe == j and s.end_keyframe == j + 1
        assert s.first_frame == p.keyframe_frames[j]
        assert p.keyframe_frames[s.end_keyframe] == s.first_frame + WINDOW - 1
        assert s.audio_rows == tuple(min(s.first_frame + i, last) for i in range(WINDOW))
        # both ends are real keyframes, never identity or pad slots
        assert s.start_keyframe in seen and s.end_keyframe in seen
        # every segment contributes at least one output frame
        assert len(p.segment_output_frames(j)) >= 1

    # every output frame: made by 1 segment, or by 2 at a shared keyframe; offset 0 to its audio row
    cover = {}
    for s in p.segments:
        for i in range(WINDOW):
            cover.setdefault(s.first_frame + i, []).append((s.index, i))
    for t in range(n):
        srcs = p.frame_sources(t)
        assert sorted(srcs) == sorted(cover[t])
        shared = t % STEP == 0 and 0 < t < p.keyframe_frames[-1]
        assert len(srcs) == (2 if shared else 1)
        for seg, i in srcs:
            assert p.segments[seg].audio_rows[i] == t  # frame t is generated from audio row t
            assert p.segments[seg].first_frame + i == t
    # frames past the end are only the overshoot of the last segment
    assert max(cover) == p.keyframe_frames[-1] >= n - 1
    assert all(t < n or seg == p.num_segments - 1 for t, v in cover.items() for seg, _ in v)
    # the rows the plan reads are exactly 0..N-1
    used = {r for s in p.segments for r in s.audio_rows} | set(p.keyframe_rows)
    used |= {sl.audio_row for b in p.batches for sl in b}
    assert used == set(range(n))
    return p


def test_plan_invariants_all_lengths():
    for n in ALL_N:
        check_plan(n)


@pytest.mark.parametrize("n", [1, 2, 7, 13, 14])
def test_short_clips(n):
    p = plan_clip(n)
    assert p.keyframe_frames == (0, 13)
    assert p.num_segments == 1 and p.num_batches == 1
    assert [s.audio_row for s in p.batches[0]] == [0, 0] + [min(13, n - 1)] * 12
    assert p.segments[0].audio_rows == tuple(min(i, n - 1) for i in range(14))
    assert [p.frame_sources(t) for t in range(n)] == [[(0, t)] for t in range(n)]


def test_ten_second_clip_matches_spec_worked_example():
    # spec 1.8 intended layout (N = 250): keyframes 0..247 + one past the end (260), 2 batches
    p = plan_clip(250)
    assert p.keyframe_frames[-2:] == (247, 260) and p.num_keyframes == 21
    assert p.num_batches == 2 and p.num_segments == 20
    assert [s.audio_row for s in p.batches[0]] == [0] + [13 * j for j in range(13)]
    assert [s.kind for s in p.batches[1]] == [IDENTITY] + [KEYFRAME] * 8 + [PAD] * 5
    assert [s.audio_row for s in p.batches[1]] == [0] + [169 + 13 * j for j in range(7)] + [249] * 6
    assert p.segments[-1].audio_rows == (247, 248) + (249,) * 12


# ---- the reference layout at its bug-free lengths (spec 1.4, 1.9: 28 and 157) ----------------------


def reference_layout(n):
    """create_pipeline_inputs of the reference as described in spec 1.4 (valid for N >= 14).

    Returns keyframe frames, [(start_kf_frame, end_kf_frame or 'pad', audio rows, merged position)]
    for the regular segments and the tail, and the flat slot list (audio row, kind)."""
    segs = []
    i = 0
    while i <= n - WINDOW:
        segs.append((i, i + STEP, tuple(range(i, i + WINDOW)), i))
        i += STEP
    m = len(segs)
    kfs = [STEP * j for j in range(m + 1)]
    seg_end = STEP * m + 1
    r = n - seg_end
    if r > 0:
        rows = tuple(range(seg_end, n))
        rows = rows + (rows[-1],) * (WINDOW - len(rows))
        segs.append((kfs[-1], "pad", rows, STEP * m))  # merged at 13 m: the tail's local 0 is averaged there
    slots = []
    for j, k in enumerate(kfs):
        if j % (WINDOW - 1) == 0:
            slots.append((0, IDENTITY))
        slots.append((k, KEYFRAME))
    while len(slots) % WINDOW:
        slots.append((slots[-1][0], PAD))
    return kfs, segs, slots


def test_reference_layout_157_identical():
    n = 157
    kfs, segs, slots = reference_layout(n)
    p = plan_clip(n)
    assert tuple(kfs) == p.keyframe_frames == p.keyframe_rows  # 0..156, no padding
    assert p.padded_rows == 0
    flat = [(s.audio_row, s.kind) for b in p.batches for s in b]
    assert flat == slots  # [ZF, 0, 13, ..., 156]: exactly one full batch
    assert [(p.keyframe_frames[s.start_keyframe], p.keyframe_frames[s.end_keyframe], s.audio_rows, s.first_frame)
            for s in p.segments] == segs


def test_reference_layout_28_same_output_mapping():
    """N = 28: identical keyframes 0/13/26, slots, regular segments and frame->row map for every output
    frame. The only difference is the tail's end keyframe, which lies past the clip: the reference pairs
    keyframe 26 with a pad copy of itself (row 26); the clean plan samples keyframe 39 from the last
    row (27). The reference tail's local frame 0 uses row 27 and is averaged into frame 26 (its
    frame 27 = row 27 matches); the clean plan uses row 26 there (offset 0 everywhere)."""
    n = 28
    kfs, segs, slots = reference_layout(n)
    p = plan_clip(n)
    assert p.keyframe_frames[:3] == tuple(kfs) == (0, 13, 26)
    assert p.keyframe_frames[3] == 39 and p.keyframe_rows[3] == 27
    real = [(s.audio_row, s.kind) for b in p.batches for s in b if s.kind != PAD]
    assert real[:4] == [x for x in slots if x[1] != PAD]
    regular = [s for s in segs if s[1] != "pad"]
    assert [(p.keyframe_frames[s.start_keyframe], p.keyframe_frames[s.end_keyframe], s.audio_rows, s.first_frame)
            for s in p.segments[:2]] == regular
    tail = segs[-1]
    assert tail[3] == p.segments[2].first_frame == 26 and tail[0] == 26
    # output frames not at a keyframe get the same audio row in both layouts
    ref_rows = {}
    for start, _, rows, pos in segs:
        for i, r in enumerate(rows):
            ref_rows.setdefault(pos + i, []).append(r)
    for t in range(n):
        ours = [p.segments[s].audio_rows[i] for s, i in p.frame_sources(t)]
        if t in kfs:
            assert t in ours and t in ref_rows[t]
        else:
            assert ours == ref_rows[t] == [t]


def test_bad_lengths():
    for bad in (0, -3):
        with pytest.raises(PlanError, match="at least 1"):
            plan_clip(bad)
    with pytest.raises(PlanError):
        plan_clip(2.5)
    with pytest.raises(IndexError):
        plan_clip(20).frame_sources(20)


def test_frames_for_samples():
    assert [video_frame_count(s) for s in (1, 319, 320, 640, 959, 960, 49520, 160000)] == [0, 0, 1, 1, 1, 2, 77, 250]
    assert video_frame_count(44100 * 10, 44100) == 250

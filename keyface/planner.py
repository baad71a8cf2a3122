"""Clip plan: where the keyframes sit, how they are batched, and which frames each segment makes.

This is the bookkeeping of spec 1.10 (the intended, clean algorithm), as a pure function of the clip
length; no torch needed. Conventions (25 fps, 640 audio samples per frame, spec 1.3):

* The clip has ``N`` audio frames (rows 0..N-1 of the per-frame features) and ``N`` output frames.
* Keyframes sit at frames ``k_j = 13 j`` for ``j = 0..m`` with ``m = max(1, ceil((N-1)/13))``, so
  the last keyframe is at ``13 m >= N-1`` (and there are always at least two, also for N = 1).
* Keyframe ``j`` is conditioned on audio/emotion row ``min(k_j, N-1)``: rows past the end of the
  clip repeat the last row. ``padded_rows = 13 m + 1 - N`` says how many such rows there are.
* Keyframe batches have 14 slots: slot 0 is the identity ("zero flag") slot, conditioned on row 0;
  then up to 13 keyframes; the last batch is padded to 14 by repeating its last real slot. The
  samples of identity and pad slots are discarded.
* Segment ``j`` (``j = 0..m-1``) makes frames ``13 j .. 13 j + 13`` from the keyframe pair
  ``(j, j+1)``; its frame ``i`` uses audio row ``min(13 j + i, N-1)``.
* Output frame ``t`` is made by segment ``t // 13`` (local frame ``t % 13``); a frame at a shared
  keyframe (``t = 13 j``, ``0 < j < m``) is also made by segment ``j-1`` (local frame 13), and
  the two decodes are averaged. Frames ``>= N`` are trimmed.

None of the reference's index bugs (spec 1.9, B1-B5) exist here: every segment's two ends are real
keyframes, frame ``t`` always uses audio row ``t``, and every length ``N >= 1`` works.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

WINDOW = 14  # frames per keyframe batch and per interpolation segment (num_frames)
OVERLAP = 1  # frames shared by consecutive segments
STEP = WINDOW - OVERLAP  # 13: keyframe spacing
KEYFRAMES_PER_BATCH = WINDOW - 1  # 13 real keyframes after the identity slot
FPS = 25

IDENTITY = "identity"
KEYFRAME = "keyframe"
PAD = "pad"


class PlanError(ValueError):
    """A clip length or plan input that cannot be planned."""


class Slot(NamedTuple):
    """One of the 14 slots of a keyframe batch."""

    audio_row: int  # feature/emotion row that conditions the slot (already clamped to N-1)
    kind: str  # "identity" | "keyframe" | "pad"
    keyframe_index: int | None  # index into ClipPlan.keyframe_frames for "keyframe" slots, else None


class Segment(NamedTuple):
    """One interpolation segment: 14 frames between two consecutive keyframes."""

    index: int
    start_keyframe: int  # index into ClipPlan.keyframe_frames
    end_keyframe: int  # start_keyframe + 1
    first_frame: int  # frame of local frame 0 (= keyframe_frames[start_keyframe])
    audio_rows: tuple  # 14 feature rows, one per local frame (clamped to N-1)


@dataclass(frozen=True)
class ClipPlan:
    num_frames: int  # N, the output length
    keyframe_frames: tuple  # (k_0 .. k_m), k_j = 13 j; the last is >= N-1
    keyframe_rows: tuple  # (min(k_j, N-1)) audio/emotion row of each keyframe
    batches: tuple  # tuple of 14-slot tuples of Slot
    segments: tuple  # tuple of Segment
    padded_rows: int  # rows past N-1 that repeat the last row (13 m + 1 - N)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_keyframes(self) -> int:
        return len(self.keyframe_frames)

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    # ---- frame bookkeeping ---------------------------------------------------------------------
    def frame_sources(self, t: int) -> list:
        """``[(segment_index, local_frame), ...]`` that make output frame ``t`` (1 or 2 entries)."""
        if not 0 <= t < self.num_frames:
            raise IndexError(f"frame {t} is outside the clip (0..{self.num_frames - 1})")
        j, i = divmod(t, STEP)
        out = []
        if i == 0 and j > 0:
            out.append((j - 1, STEP))
        if j < len(self.segments):
            out.append((j, i))
        return out

    def segment_output_frames(self, s: int) -> range:
        """Output frames (< N) that segment ``s`` contributes to."""
        first = self.segments[s].first_frame
        return range(first, min(first + WINDOW, self.num_frames))

    def batch_keyframes(self, b: int) -> list:
        """``[(slot_index, keyframe_index), ...]`` for the real keyframe slots of batch ``b``."""
        return [(i, s.keyframe_index) for i, s in enumerate(self.batches[b]) if s.kind == KEYFRAME]

    def describe(self) -> str:
        return (
            f"{self.num_frames} frames ({self.num_frames / FPS:.2f} s): {self.num_keyframes} keyframes "
            f"in {self.num_batches} batch(es) of {WINDOW} slots, {self.num_segments} segments"
        )


def num_segments_for(num_frames: int) -> int:
    """m = max(1, ceil((N-1)/13))."""
    return max(1, -(-(num_frames - 1) // STEP))


def plan_clip(num_frames: int) -> ClipPlan:
    """Plan a clip of ``num_frames`` (N >= 1) audio frames at 25 fps; see the module docstring."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int):
        try:
            num_frames = operator.index(num_frames)
        except TypeError:
            raise PlanError(f"num_frames must be an integer, got {num_frames!r}") from None
    if num_frames < 1:
        raise PlanError(
            f"a clip needs at least 1 frame (audio of 20 ms or more, which rounds to one 40 ms frame at 25 fps), "
            f"got num_frames={num_frames}"
        )
    n = num_frames
    last = n - 1
    m = num_segments_for(n)
    kf_frames = tuple(STEP * j for j in range(m + 1))
    kf_rows = tuple(min(k, last) for k in kf_frames)

    batches = []
    for start in range(0, len(kf_frames), KEYFRAMES_PER_BATCH):
        group = range(start, min(start + KEYFRAMES_PER_BATCH, len(kf_frames)))
        slots = [Slot(0, IDENTITY, None)]
        slots += [Slot(kf_rows[j], KEYFRAME, j) for j in group]
        while len(slots) < WINDOW:
            slots.append(Slot(slots[-1].audio_row, PAD, None))
        batches.append(tuple(slots))

    segments = tuple(
        Segment(
            index=j,
            start_keyframe=j,
            end_keyframe=j + 1,
            first_frame=kf_frames[j],
            audio_rows=tuple(min(kf_frames[j] + i, last) for i in range(WINDOW)),
        )
        for j in range(m)
    )
    return ClipPlan(
        num_frames=n,
        keyframe_frames=kf_frames,
        keyframe_rows=kf_rows,
        batches=tuple(batches),
        segments=segments,
        padded_rows=STEP * m + 1 - n,
    )


def video_frame_count(num_samples: int, sample_rate: int = 16000) -> int:
    """N = round(seconds x 25), half up: the number of video frames KeyFace renders for a clip.

    The video length closest to the audio's (within half a frame). The original renders
    ceil(S / 640) frames at 16 kHz instead, up to one frame longer than the audio (spec 1.3, 1.7).
    """
    return (2 * int(num_samples) * FPS + int(sample_rate)) // (2 * int(sample_rate))


def audio_samples_for_frames(num_frames: int, sample_rate: int) -> int:
    """round(N x sample_rate / 25), half up: the audio samples of exactly N video frames.

    An output file's audio track is the input cut, or padded with silence, to this length, so audio
    and video both last N / 25 s.
    """
    n, sr = int(num_frames), int(sample_rate)
    if n < 0 or sr <= 0:
        raise ValueError(f"audio_samples_for_frames: need num_frames >= 0 and sample_rate > 0, got {n}, {sr}")
    return (2 * n * sr + FPS) // (2 * FPS)

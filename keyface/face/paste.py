"""Paste-back: generated face frames -> frames at the original picture's size and aspect.

:class:`FacePaster` is built once per clip from a :class:`~keyface.face.align.FaceCrop`; it
precomputes, for the image region the crop square covers, where each pixel lies in the crop and a
feathered mask. Each chunk of generated frames is then warped back (inverse transform, bilinear),
optionally colour-matched to the original around the seam, and blended over the original picture;
pixels outside that region are the original's, untouched. Work per frame is proportional to the
face region, not the picture, and nothing depends on the clip length (chunk by chunk, flat memory).

Feather: the mask is 1 inside the square and falls to 0 at its edges over ``feather`` x side
(smoothstep), so the seam is soft. Colour match: per frame, the mean colour of the generated face
in the seam band is shifted to the original's mean there (the whole face by the same offset), which
hides a slight colour drift of the model at the seam.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import DEFAULT_COLOR_MATCH, DEFAULT_FEATHER
from .align import FaceCrop, _crop_centres, crop_face


class PasteError(ValueError):
    """Frames or settings that cannot be pasted back."""


def _smoothstep(t):
    t = t.clamp(0, 1)
    return t * t * (3 - 2 * t)


def crop_mask(size: int, feather: float) -> torch.Tensor:
    """[size, size] in 0..1: 1 inside, falling smoothly to 0 over ``feather`` x size at the edges."""
    p = _crop_centres(size)
    edge = torch.minimum(torch.minimum(p[..., 0], size - p[..., 0]), torch.minimum(p[..., 1], size - p[..., 1]))
    if feather <= 0:
        return torch.ones(size, size)
    return _smoothstep(edge / (feather * size)).float()


def _seam_band(mask: torch.Tensor) -> torch.Tensor:
    """Weights of the seam band (where the mask is neither 0 nor 1), peaking mid-way."""
    return (mask * (1 - mask) * 4).clamp(0, 1)


class FacePaster:
    """Paste generated frames back into ``crop.image``.

    ``feather`` in [0, 0.5] (fraction of the crop side); ``color_match``: see the module docstring;
    ``even``: drop the last row / column of an odd-sized picture (H.264 yuv420p needs even sizes).
    """

    def __init__(self, crop: FaceCrop, feather: float = DEFAULT_FEATHER, color_match: bool = DEFAULT_COLOR_MATCH,
                 even: bool = False):
        if not isinstance(crop, FaceCrop):
            raise PasteError(f"face_crop: expected a KEYFACE_CROP (FaceCrop), got {type(crop).__name__}")
        if not 0.0 <= float(feather) <= 0.5:
            raise PasteError(f"feather: expected 0 .. 0.5 (fraction of the crop side), got {feather!r}")
        self.crop, self.feather, self.color_match = crop, float(feather), bool(color_match)
        t = crop.transform
        h, w = crop.height, crop.width
        if even:
            h, w = h - h % 2, w - w % 2
        if h < 2 or w < 2:
            raise PasteError(f"face_crop: the picture is too small ({crop.width}x{crop.height})")
        self.height, self.width = h, w
        self.background = crop.image[:h, :w]
        x0, y0, x1, y1 = t.image_bounds(w, h)
        if x1 <= x0 or y1 <= y0:
            raise PasteError("face_crop: its square does not overlap the picture")
        self.region = (x0, y0, x1, y1)
        ys = torch.arange(y0, y1, dtype=torch.float64) + 0.5
        xs = torch.arange(x0, x1, dtype=torch.float64) + 0.5
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        q = t.image_to_crop(torch.stack([xx, yy], dim=-1))  # crop coordinates of each region pixel
        self.grid = (q * (2.0 / t.size) - 1.0).float()[None]  # [1, rh, rw, 2], independent of the frame size
        mask = crop_mask(t.size, self.feather)
        self.mask = F.grid_sample(mask[None, None], self.grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)[0, 0][..., None]  # [rh, rw, 1]
        self._background_region = self.background[y0:y1, x0:x1].float()  # 0..255
        self._buffer = None  # reused full-size uint8 output (paste_uint8(reuse=True)): only the region changes
        self._reference = {}  # frame size -> (seam band mean colour of the original crop, band weights)

    # ------------------------------------------------------------------------------------------
    def _seam_reference(self, size: int):
        """(original crop's mean colour in the seam band [3], band weights [size * size] summing to 1)."""
        if size not in self._reference:
            ref = crop_face(self.crop.image, self.crop.transform).permute(2, 0, 1)[None]  # the model's input
            if ref.shape[-1] != size:
                ref = F.interpolate(ref, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            band = _seam_band(crop_mask(size, max(self.feather, 0.05))).reshape(-1)
            band = band / band.sum()
            self._reference[size] = (ref[0].reshape(3, -1) @ band, band)
        return self._reference[size]

    def _colour_offsets(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [n, 3, s, s] -> per-frame colour offsets [n, 3, 1, 1] that move the seam band's mean
        colour to the original's (weighted means as one matrix product: one pass over the frames)."""
        ref_mean, band = self._seam_reference(frames.shape[-1])
        frame_mean = frames.reshape(frames.shape[0], 3, -1) @ band
        return (ref_mean[None] - frame_mean)[..., None, None]

    def _warped(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [n, s, s, 3] 0..1 -> the face region [n, rh, rw, 3]."""
        x = frames.permute(0, 3, 1, 2).float()
        offsets = self._colour_offsets(x) if self.color_match else None
        side = self.crop.transform.side
        if x.shape[-1] > 1.5 * side:  # the face shrinks in the picture: antialias before warping
            s = max(2, round(side))
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        if offsets is not None:  # resampling keeps means, so the shift can follow it (fewer pixels)
            x = x + offsets
        grid = self.grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).permute(0, 2, 3, 1)

    def _check(self, frames, what: str = "frames") -> torch.Tensor:
        f = torch.as_tensor(frames)
        if f.dim() == 3:
            f = f[None]
        if f.dim() != 4 or f.shape[-1] < 3 or f.shape[1] != f.shape[2]:
            raise PasteError(f"{what}: expected square KeyFace frames [n, s, s, 3], got {tuple(f.shape)}")
        f = f[..., :3].detach().cpu()
        if f.dtype == torch.uint8:
            return f.float() / 255.0
        f = f.float()
        if not torch.isfinite(f.sum()):  # one cheap pass: any NaN / inf makes the sum non-finite
            raise PasteError(f"{what}: hold NaN or infinite values")
        return f

    def _full_frames(self, n: int, reuse: bool) -> torch.Tensor:
        if not reuse:
            return self.background[None].expand(n, -1, -1, -1).clone()
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = self.background[None].expand(n, -1, -1, -1).clone()
        return self._buffer[:n]

    def paste_uint8(self, frames, reuse: bool = False) -> torch.Tensor:
        """frames [n, s, s, 3] (0..1 float or uint8) -> uint8 [n, H, W, 3] (for the mp4 writer).

        ``reuse=True``: the result is a view of a buffer the next call overwrites (only the face region
        changes between calls, so the full-size background is not copied again for every frame);
        consume it (e.g. encode it) before the next call.
        """
        f = self._check(frames)
        x0, y0, x1, y1 = self.region
        out = self._full_frames(f.shape[0], reuse)
        face = self._warped(f).clamp_(0, 1).mul_(255.0)
        blended = torch.lerp(self._background_region[None], face, self.mask)
        out[:, y0:y1, x0:x1] = blended.add_(0.5).clamp_(0, 255).to(torch.uint8)
        return out

    def paste(self, frames, what: str = "frames") -> torch.Tensor:
        """frames [n, s, s, 3] -> float32 [n, H, W, 3] in 0..1 (an IMAGE batch); ``what`` names them in errors."""
        f = self._check(frames, what)
        x0, y0, x1, y1 = self.region
        out = (self.background.float() / 255.0)[None].expand(f.shape[0], -1, -1, -1).clone()
        bg = out[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = torch.lerp(bg, self._warped(f).clamp(0, 1), self.mask)
        return out

    def stream(self, chunks, uint8: bool = True):
        """Paste each chunk of an iterator of frame chunks; yields the full-size chunks (uint8 ones
        share one buffer: consume each before asking for the next)."""
        for chunk in chunks:
            yield self.paste_uint8(chunk, reuse=True) if uint8 else self.paste(chunk)

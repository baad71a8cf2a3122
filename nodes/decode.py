"""KeyFace Decode, and the segment decoding KeyFace Save Video (nodes/video.py) shares with it."""

from __future__ import annotations

from . import _common as C


def segments_from_latent(latent, input_name="latent"):
    """([S, 14, 4, h, w] sampler-scaled latents, N) from a KeyFace Interpolate LATENT (raw VAE
    latents); ValueError naming the input otherwise."""
    from ..keyface import validate
    from ..keyface.latents import to_scaled
    from ..keyface.planner import WINDOW

    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{input_name}: expected a LATENT dict")
    if "keyface_num_frames" not in latent:
        raise ValueError(f"{input_name}: this LATENT does not come from KeyFace Interpolate (no keyface_num_frames); "
                         "KeyFace Decode needs the segment layout that node records")
    x = latent["samples"]
    t = validate.integer(f"{input_name}: keyface_segment_frames", latent.get("keyface_segment_frames", WINDOW), 1)
    n = validate.integer(f"{input_name}: keyface_num_frames", latent["keyface_num_frames"], 1)
    if not hasattr(x, "ndim") or x.ndim != 4 or x.shape[0] % t:
        raise ValueError(f"{input_name}: samples {tuple(getattr(x, 'shape', ()))} are not whole {t}-frame segments")
    return to_scaled(x.reshape(x.shape[0] // t, t, *x.shape[1:])), n


def decode_chunks(vae, segments, num_frames, chunk_frames, progress):
    """Iterator of decoded frame chunks [n, H, W, 3] (0..1, on the intermediate device) of
    ``segments_from_latent``'s ([S, 14, 4, h, w], N)."""
    import torch
    from ..keyface import pipeline
    from ..keyface.memory import segment_decode_rows

    # ask the memory manager for the user's chunk; the library then fits the chunk to what is free
    C.load([vae.patcher], C.decode_memory(vae, segment_decode_rows(chunk_frames), tuple(segments.shape[-2:])))
    out_device = C.mm().intermediate_device()
    with torch.inference_mode():
        for chunk in pipeline.decode_segments(vae.vae, segments, num_frames, chunk_frames=int(chunk_frames),
                                              device=vae.device, dtype=vae.compute_dtype, callback=progress,
                                              free_memory=C.free_memory(vae.device)):
            C.check_interrupt()
            yield chunk.to(out_device, torch.float32)


LONG_CLIPS = ("For long clips use KeyFace Save Video, which decodes chunk by chunk into the mp4 (memory stays "
              "flat), or render a shorter clip.")


class KeyFaceDecode:
    DESCRIPTION = ("Decodes KeyFace Interpolate's latents with the SVD temporal decoder in fixed chunks (moved to "
                   "the CPU one by one), merges the frames segments share, and returns exactly frame_count frames.")
    CATEGORY = C.CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = (f"The video frames ({C.FPS:g} fps), as many as KeyFace Encode Audio's frame_count.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("KEYFACE_VAE", {"tooltip": "From KeyFace Load VAE."}),
            "latent": ("LATENT", {"tooltip": "From KeyFace Interpolate."}),
            "chunk_frames": ("INT", {"default": C.render_defaults().chunk_frames, "min": 1, "max": 256,
                                     "tooltip": "Most frames per decoder call (each frame is decoded on its own, decoding_t = 1 as released, so this changes memory use and speed, not the result). Fewer are decoded per call when the free memory ComfyUI reports cannot hold this many."}),
        }}

    def decode(self, vae, latent, chunk_frames):
        C.check_widgets(type(self), chunk_frames=chunk_frames)
        seg, n = segments_from_latent(latent)
        frames, at = None, 0
        for chunk in decode_chunks(vae, seg, n, chunk_frames, C.Progress()):
            if frames is None:  # the frame size is the first chunk's
                frames = C.image_batch(n, chunk.shape[1], chunk.shape[2], chunk.device, "KeyFace Decode", LONG_CLIPS)
            frames[at:at + chunk.shape[0]] = chunk
            at += chunk.shape[0]
        if at != n:  # never hand on a batch with unfilled (uninitialised) frames
            raise RuntimeError(f"KeyFace Decode: the decoder gave {at} of the clip's {n} frames")
        return (frames,)


NODE_CLASS_MAPPINGS = {"KeyFaceDecode": KeyFaceDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"KeyFaceDecode": "KeyFace Decode"}

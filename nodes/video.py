"""KeyFace Save Video: decodes KeyFace Interpolate's latents chunk by chunk straight into an mp4.

The whole clip never exists as one IMAGE tensor: each decoded chunk is encoded (H.264) and the audio
(AAC) is interleaved as frames arrive. The file appears under its final name only when complete; a
cancel or an error leaves no partial file.
"""

from __future__ import annotations

import logging
import os

from ..keyface.memory import LATENT_DOWNSCALE
from . import _common as C
from .decode import decode_chunks, segments_from_latent
from .face import _paste_inputs, face_paster

log = logging.getLogger("keyface")


class KeyFaceSaveVideo(C.Mp4OutputNode):
    DESCRIPTION = ("Decodes KeyFace latents in fixed chunks and streams them into an H.264/AAC mp4 in the output "
                   f"folder (flat memory for long clips). The audio is cut, or padded with silence, to the video length (N / {C.FPS:g} s).")
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        from ..keyface.settings import DEFAULT_CRF  # torch-free

        return {"required": {
            "vae": ("KEYFACE_VAE", {"tooltip": "From KeyFace Load VAE."}),
            "latent": ("LATENT", {"tooltip": "From KeyFace Interpolate."}),
            "audio": ("AUDIO", {"tooltip": "The speech (e.g. KeyFace Encode Audio's audio output)."}),
            "filename_prefix": ("STRING", {"default": "keyface/KeyFace", "tooltip": "Output file prefix, relative to the output folder."}),
            "chunk_frames": ("INT", {"default": C.render_defaults().chunk_frames, "min": 1, "max": 256,
                                     "tooltip": "Most frames per decoder call (memory/speed only; frames are decoded one by one as released). Fewer per call when the free memory ComfyUI reports cannot hold this many."}),
            "crf": ("INT", {"default": DEFAULT_CRF, "min": 0, "max": 51, "tooltip": "H.264 quality (lower = better, bigger)."}),
        }, "optional": {
            "face_crop": ("KEYFACE_CROP", {"tooltip": "From KeyFace Detect & Crop Face: each chunk is pasted back "
                                                      "into the original photo, so the video has the photo's size."}),
            **_paste_inputs(),
        }}

    def save(self, vae, latent, audio, filename_prefix, chunk_frames, crf, face_crop=None, feather=None,
             color_match=None):
        import folder_paths
        from ..keyface.pipeline import mp4_writer
        from ..keyface.video_io import fit_audio_to_frames

        C.check_widgets(type(self), filename_prefix=filename_prefix, chunk_frames=chunk_frames, crf=crf)
        seg, n = segments_from_latent(latent)
        frame_size = int(seg.shape[-1]) * LATENT_DOWNSCALE, int(seg.shape[-2]) * LATENT_DOWNSCALE
        paster = face_paster(face_crop, feather, color_match)  # None without a face_crop
        size = frame_size if paster is None else (paster.width, paster.height)
        waveform, sr = C.first_clip(audio)
        waveform = fit_audio_to_frames(waveform, sr, n)  # exactly n / 25 s: cut, or padded with silence
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir, size[0], size[1])
        file = f"{name}_{counter:05}_.mp4"
        path = os.path.join(folder, file)
        progress = C.Progress()
        with mp4_writer(path, *frame_size, paste_back=paster, fps=int(C.FPS), audio=waveform, sample_rate=sr,
                        num_frames=n, crf=int(crf)) as writer:
            for chunk in decode_chunks(vae, seg, n, chunk_frames, progress):
                writer.write(chunk)  # pasted back (with a face_crop) and encoded in the writer's thread
        log.info("KeyFace: wrote %s (%d frames)", path, n)
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}], "animated": (True,)},
                "result": (path, n)}


NODE_CLASS_MAPPINGS = {"KeyFaceSaveVideo": KeyFaceSaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"KeyFaceSaveVideo": "KeyFace Save Video (streaming mp4)"}

"""Loader nodes: VAE, audio encoders, keyframe model, interpolation model (+ autoguidance model).

Every network is built by the library with ComfyUI's layer classes injected as ``operations`` and
then handed to ComfyUI's memory manager (``ModelPatcher`` + ``load_models_gpu`` before each use),
so KeyFace models are evicted / partially loaded like any core model.
"""

from __future__ import annotations

from . import _common as C


# ----------------------------------------------------------------------------------- model holders
class KeyFaceVAE:
    """KEYFACE_VAE: the SVD VAE (encoder for the identity image, temporal decoder for the video)."""

    def __init__(self, vae, patcher, compute_dtype, name):
        self.vae, self.patcher, self.compute_dtype, self.name = vae, patcher, compute_dtype, name

    @property
    def device(self):
        return self.patcher.load_device

    def __repr__(self):
        return f"KeyFaceVAE({self.name}, {self.compute_dtype})"


class KeyFaceAudioEncoders:
    """KEYFACE_AUDIO_ENCODERS: WavLM Base+, BEATs and wav2vec2 (one object, one memory-manager group)."""

    def __init__(self, wavlm, beats, wav2vec2, patchers, compute_dtype, names):
        self.wavlm, self.beats, self.wav2vec2 = wavlm, beats, wav2vec2
        self.patchers, self.compute_dtype, self.names = patchers, compute_dtype, names

    @property
    def device(self):
        return self.patchers[0].load_device

    def __repr__(self):
        return f"KeyFaceAudioEncoders({self.names})"


class KeyFaceKeyframeModel:
    """KEYFACE_KEYFRAME_MODEL."""

    def __init__(self, network, patcher, compute_dtype, resolution, name):
        self.network, self.patcher, self.compute_dtype, self.resolution, self.name = network, patcher, compute_dtype, resolution, name

    @property
    def device(self):
        return self.patcher.load_device

    def __repr__(self):
        return f"KeyFaceKeyframeModel({self.name}, {self.resolution}px, {self.compute_dtype})"


class KeyFaceInterpolationModel:
    """KEYFACE_INTERPOLATION_MODEL: the interpolation network and its autoguidance ("bad") network."""

    def __init__(self, good, bad, patchers, compute_dtype, name, bad_name):
        self.good, self.bad, self.patchers, self.compute_dtype = good, bad, patchers, compute_dtype
        self.name, self.bad_name = name, bad_name

    @property
    def device(self):
        return self.patchers[0].load_device

    @property
    def latent_hw(self):
        return self.good.latent_hw

    def __repr__(self):
        return f"KeyFaceInterpolationModel({self.name}, bad={self.bad_name}, {self.compute_dtype})"


# ---------------------------------------------------------------------------------------- nodes
class KeyFaceVAELoader:
    DESCRIPTION = "Loads the Stable Video Diffusion VAE that KeyFace uses: the encoder makes the identity latent, the temporal decoder turns latents into frames."
    CATEGORY = C.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("KEYFACE_VAE",)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The SVD VAE (SGM or diffusers layout), run in fp32 or bf16.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (C.choices("vae"), {"tooltip": "SVD VAE file from models/keyface/ or models/vae/ (svd_vae.safetensors, the diffusers AutoencoderKLTemporalDecoder file, or a full SVD checkpoint)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        return C.validate_models(vae_name=("vae", vae_name))

    def load(self, vae_name):
        import comfy.ops
        from ..keyface import vae as kvae

        path = C.resolve("vae", vae_name, "vae_name")
        load_device, offload_device, dtype = C.vae_policy()
        model = kvae.load_vae(path, dtype=dtype, device=offload_device, operations=comfy.ops.disable_weight_init)
        model = model.to(device=offload_device, dtype=dtype).eval().requires_grad_(False)
        return (KeyFaceVAE(model, C.patcher(model, load_device, offload_device), dtype, vae_name),)


class KeyFaceAudioEncoderLoader:
    DESCRIPTION = "Loads the three audio encoders KeyFace conditions on: WavLM Base+ and BEATs (unilm checkpoints) and wav2vec2-base-960h (a Hugging Face folder)."
    CATEGORY = C.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("KEYFACE_AUDIO_ENCODERS",)
    RETURN_NAMES = ("audio_encoders",)
    OUTPUT_TOOLTIPS = ("WavLM + BEATs + wav2vec2, managed by ComfyUI like a text encoder.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "wavlm_name": (C.choices("wavlm"), {"tooltip": "WavLM Base+ (WavLM-Base+.pt) from models/keyface/ or models/audio_encoders/."}),
            "beats_name": (C.choices("beats"), {"tooltip": "BEATs iter3+ AS2M fine-tuned (BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt)."}),
            "wav2vec2_name": (C.choices("wav2vec2"), {"tooltip": "wav2vec2-base-960h: a Hugging Face folder with config.json and the weights."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, wavlm_name, beats_name, wav2vec2_name):
        return C.validate_models(wavlm_name=("wavlm", wavlm_name), beats_name=("beats", beats_name),
                                 wav2vec2_name=("wav2vec2", wav2vec2_name))

    def load(self, wavlm_name, beats_name, wav2vec2_name):
        import functools

        import comfy.ops
        from ..keyface.audio import load_beats, load_wav2vec2, load_wavlm

        load_device, offload_device, dtype = C.audio_encoder_policy()
        names = {"wavlm": wavlm_name, "beats": beats_name, "wav2vec2": wav2vec2_name}
        # every name is resolved before the first (slow) load, so a missing file fails at once
        paths = {kind: C.resolve(kind, name, f"{kind}_name") for kind, name in names.items()}
        # BEATs is our own module and takes ComfyUI's layers; WavLM and wav2vec2 are transformers
        # models with torch layers, which KeyFace Encode Audio therefore always loads fully.
        loaders = {"wavlm": load_wavlm, "wav2vec2": load_wav2vec2,
                   "beats": functools.partial(load_beats, operations=comfy.ops.disable_weight_init)}
        # the library loaders return eval-mode, grad-free modules already cast and placed
        models = {kind: loaders[kind](path, dtype=dtype, device=offload_device) for kind, path in paths.items()}
        patchers = [C.patcher(m, load_device, offload_device) for m in models.values()]
        return (KeyFaceAudioEncoders(models["wavlm"], models["beats"], models["wav2vec2"], patchers, dtype, names),)


class KeyFaceKeyframeModelLoader:
    DESCRIPTION = "Loads the KeyFace keyframe model (keyframe.pt or its safetensors conversion)."
    CATEGORY = C.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("KEYFACE_KEYFRAME_MODEL",)
    RETURN_NAMES = ("keyframe_model",)
    OUTPUT_TOOLTIPS = ("The keyframe UNet + audio projection under ComfyUI's memory manager.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (C.choices("keyframe"), {"tooltip": "keyframe.pt (DeepSpeed file as released) or keyframe.safetensors, from models/keyface/."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return C.validate_models(model_name=("keyframe", model_name))

    def load(self, model_name):
        from ..keyface import engines, model_files

        path = C.resolve("keyframe", model_name, "model_name")
        load_device, offload_device, weight_dtype, compute_dtype, ops = C.unet_policy(C.file_params(path))
        # the library reads (and checks) the sidecar config itself; the node needs only its resolution
        net = engines.load_keyframe_network(path, dtype=weight_dtype, device=offload_device, operations=ops)
        C.use_compute_dtype(net, weight_dtype, compute_dtype)
        C.log.info("KeyFace: keyframe model weights %s, compute %s", weight_dtype, compute_dtype)
        res = model_files.resolution_of(model_files.read_sidecar(path))
        return (KeyFaceKeyframeModel(net, C.patcher(net, load_device, offload_device), compute_dtype, res, model_name),)


class KeyFaceInterpolationModelLoader:
    DESCRIPTION = "Loads the KeyFace interpolation model and the weaker 'bad' model used for autoguidance (interpolation.pt + interpolation_bad.pt)."
    CATEGORY = C.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("KEYFACE_INTERPOLATION_MODEL",)
    RETURN_NAMES = ("interpolation_model",)
    OUTPUT_TOOLTIPS = ("Interpolation UNet + autoguidance UNet under ComfyUI's memory manager.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (C.choices("interpolation"), {"tooltip": "interpolation.pt (or .safetensors) from models/keyface/."}),
            "bad_model_name": (C.choices("interpolation_bad"), {"tooltip": "interpolation_bad.pt: the autoguidance network (D = D_bad + scale x (D_good - D_bad))."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name, bad_model_name):
        return C.validate_models(model_name=("interpolation", model_name),
                                 bad_model_name=("interpolation_bad", bad_model_name))

    def load(self, model_name, bad_model_name):
        from ..keyface import engines

        path = C.resolve("interpolation", model_name, "model_name")
        bad_path = C.resolve("interpolation_bad", bad_model_name, "bad_model_name")
        n = C.file_params(path) + C.file_params(bad_path)
        load_device, offload_device, weight_dtype, compute_dtype, ops = C.unet_policy(n)
        good, bad = engines.load_interpolation_networks(
            path, bad_path, dtype=weight_dtype, device=offload_device, operations=ops)
        for net in (good, bad):
            if net is not None:
                C.use_compute_dtype(net, weight_dtype, compute_dtype)
        C.log.info("KeyFace: interpolation models weights %s, compute %s", weight_dtype, compute_dtype)
        patchers = [C.patcher(good, load_device, offload_device)]
        if bad is not None:
            patchers.append(C.patcher(bad, load_device, offload_device))
        return (KeyFaceInterpolationModel(good, bad, patchers, compute_dtype, model_name, bad_model_name),)


NODE_CLASS_MAPPINGS = {
    "KeyFaceVAELoader": KeyFaceVAELoader,
    "KeyFaceAudioEncoderLoader": KeyFaceAudioEncoderLoader,
    "KeyFaceKeyframeModelLoader": KeyFaceKeyframeModelLoader,
    "KeyFaceInterpolationModelLoader": KeyFaceInterpolationModelLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KeyFaceVAELoader": "KeyFace Load VAE",
    "KeyFaceAudioEncoderLoader": "KeyFace Load Audio Encoders",
    "KeyFaceKeyframeModelLoader": "KeyFace Load Keyframe Model",
    "KeyFaceInterpolationModelLoader": "KeyFace Load Interpolation Model",
}

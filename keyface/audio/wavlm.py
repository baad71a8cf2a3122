"""WavLM (Base+ in the release) through ``transformers.WavLMModel``.

The original KeyFace code runs the unilm ``WavLM`` class on ``WavLM-Base+.pt`` (``{"cfg", "model"}``)
and keeps the final layer's output (spec 2.3). ``transformers.WavLMModel`` computes the same function
(post-LN layers, relative position bias owned by layer 0, gate from the un-projected layer input), so
the unilm weights are renamed key by key into it. A Hugging Face folder / safetensors of the same
model loads directly.

Every key of the file is accounted for: the only unilm key without a use at inference is
``mask_emb`` (the training-time mask vector); it is kept as ``masked_spec_embed`` when the built
model has one and ignored otherwise.
"""

from __future__ import annotations

import ast
import re

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoints import CheckpointError, KeyLedger
from ._common import (
    WorkCounter,
    as_batch,
    build_from_config,
    attention_block_rows,
    attention_units,
    conv_output_length,
    conv_units,
    hf_encoder_keys,
    load_strict,
    module_device_dtype,
    read_encoder_file,
    run_conv_layers,
    spans,
)

# unilm WavLMConfig defaults (used only for keys a cfg does not carry)
UNILM_DEFAULTS = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "normalize": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
    "mask_prob": 0.65,
}


def parse_conv_layers(spec) -> list:
    """Evaluate a fairseq ``conv_feature_layers`` string (lists of int tuples, ``+`` and ``*``) safely."""
    if isinstance(spec, (list, tuple)):
        return [tuple(int(x) for x in t) for t in spec]

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported element {ast.dump(node)}")

    try:
        layers = ev(ast.parse(str(spec), mode="eval"))
        layers = [tuple(int(x) for x in t) for t in layers]
        if not layers or any(len(t) != 3 for t in layers):
            raise ValueError("expected a list of (dim, kernel, stride)")
    except (SyntaxError, ValueError, TypeError) as err:
        raise CheckpointError(f"WavLM cfg: cannot read conv_feature_layers {spec!r} ({err})") from None
    return layers


def wavlm_config_from_unilm(cfg: dict):
    """``transformers.WavLMConfig`` equivalent to a unilm WavLM ``cfg`` dict (eval: dropouts 0)."""
    from transformers import WavLMConfig

    c = dict(UNILM_DEFAULTS)
    c.update(cfg or {})
    if not c["relative_position_embedding"] or not c["gru_rel_pos"]:
        raise CheckpointError(
            "WavLM cfg: relative_position_embedding and gru_rel_pos must both be True (as in every released "
            f"WavLM); got {c['relative_position_embedding']} / {c['gru_rel_pos']}"
        )
    modes = {"default": "group", "layer_norm": "layer"}
    if c["extractor_mode"] not in modes:
        raise CheckpointError(f"WavLM cfg: unknown extractor_mode {c['extractor_mode']!r}")
    layers = parse_conv_layers(c["conv_feature_layers"])
    mask_prob = float(c.get("mask_prob") or 0.0)
    return WavLMConfig(
        hidden_size=int(c["encoder_embed_dim"]),
        num_hidden_layers=int(c["encoder_layers"]),
        num_attention_heads=int(c["encoder_attention_heads"]),
        intermediate_size=int(c["encoder_ffn_embed_dim"]),
        hidden_act=c["activation_fn"],
        feat_extract_norm=modes[c["extractor_mode"]],
        feat_extract_activation="gelu",
        conv_dim=[t[0] for t in layers],
        conv_kernel=[t[1] for t in layers],
        conv_stride=[t[2] for t in layers],
        num_feat_extract_layers=len(layers),
        conv_bias=bool(c["conv_bias"]),
        num_conv_pos_embeddings=int(c["conv_pos"]),
        num_conv_pos_embedding_groups=int(c["conv_pos_groups"]),
        num_buckets=int(c["num_buckets"]),
        max_bucket_distance=int(c["max_distance"]),
        do_stable_layer_norm=bool(c["layer_norm_first"]),
        layer_norm_eps=1e-5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=mask_prob if mask_prob > 0 else 0.05,  # only decides whether masked_spec_embed exists
        apply_spec_augment=False,
        do_normalize=bool(c["normalize"]),
    )


# unilm key (regex) -> HF key template; layer index captured as \1
_UNILM_RULES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # GroupNorm (default mode)
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),  # LayerNorm mode
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.(weight_g|weight_v|bias)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)", r"encoder.layers.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight", r"encoder.layers.\1.attention.rel_attn_embed.weight"),
    (r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(weight|bias)", r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.grep_a", r"encoder.layers.\1.attention.gru_rel_pos_const"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]
_UNILM_RULES = [(re.compile(p + r"$"), r) for p, r in _UNILM_RULES]


def convert_unilm_state_dict(sd: dict, model_keys, source="WavLM checkpoint") -> dict:
    """Rename a unilm WavLM state dict to ``transformers.WavLMModel`` keys; every key is accounted for."""
    ledger = KeyLedger(sd, source)
    out = {}
    for key in list(sd):
        if key == "mask_emb":
            continue
        for pat, repl in _UNILM_RULES:
            if pat.match(key):
                out[pat.sub(repl, key)] = ledger.take_key(key)
                break
    if "post_extract_proj.weight" not in sd and "feature_projection.projection.weight" in set(model_keys):
        # unilm has no projection when the conv width equals the model width; transformers always
        # has one: an identity map computes the same function
        convs = {int(m.group(1)): v for k, v in sd.items()
                 if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight$", k))}
        if not convs:
            raise CheckpointError(f"{source}: no feature_extractor.conv_layers.*.0.weight keys; not a WavLM checkpoint")
        conv_dim = convs[max(convs)].shape[0]
        ln = sd.get("layer_norm.weight")
        dtype = ln.dtype if ln is not None else torch.float32
        out["feature_projection.projection.weight"] = torch.eye(conv_dim, dtype=dtype)
        out["feature_projection.projection.bias"] = torch.zeros(conv_dim, dtype=dtype)
    if "mask_emb" in sd:
        if "masked_spec_embed" in set(model_keys):
            out["masked_spec_embed"] = ledger.take_key("mask_emb")
        else:
            ledger.ignore("mask_emb", "training-time mask embedding; never used at inference")
    ledger.finish("These are not WavLM encoder weights (is this a different model's checkpoint?)")
    return out


class WavLMEncoder(nn.Module):
    """``forward(waveform [S] or [B, S], raw, 16 kHz, attention_chunk=None) -> last_hidden_state [B, L, hidden]``.

    ``normalize`` reproduces the unilm wrapper: a whole-sequence ``layer_norm`` of the input when the
    checkpoint's ``cfg.normalize`` is True (False for Base+).

    ``attention_chunk``: None (default) runs ``transformers.WavLMModel`` as is; it materialises the
    relative-position bias, its gated copy and the attention weights for the whole sequence
    (heads x L x L each, L = 50 per second of audio). An int runs the same layers with the attention
    computed in blocks of that many query rows (bias rows built per block), so long clips need
    memory proportional to L x chunk instead of L^2 (blocks are made smaller still for long clips,
    see :func:`~keyface.audio._common.attention_block_rows`). Same function; rounding differs by
    ~1e-6. It is an argument of each call, not module state, so threads may share a module.

    ``progress``: ``progress(done, total)`` after each unit of work (a conv layer, an attention block,
    a feed-forward), chunked path only; an exception it raises stops the call there (cancel).
    """

    def __init__(self, model, normalize: bool = False):
        super().__init__()
        self.model = model
        self.normalize = bool(normalize)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, waveform: torch.Tensor, attention_chunk: int | None = None, progress=None) -> torch.Tensor:
        device, dtype = module_device_dtype(self)
        x = as_batch(waveform).to(device=device, dtype=torch.float32)
        if self.normalize:
            x = F.layer_norm(x, x.shape)
        x = x.to(dtype)
        if attention_chunk:
            return self._forward_chunked(x, int(attention_chunk), WorkCounter(progress))
        return self.model(x).last_hidden_state

    def _forward_chunked(self, x, chunk, counter: WorkCounter):
        m = self.model
        enc = m.encoder
        tokens = conv_output_length(x.shape[-1], m.config.conv_kernel, m.config.conv_stride)
        counter.expect(conv_units(x.shape[-1], m.feature_extractor.conv_layers)
                       + attention_units(len(enc.layers), m.config.num_attention_heads, tokens, chunk))
        h, _ = m.feature_projection(run_conv_layers(m.feature_extractor.conv_layers, x, counter).transpose(1, 2))
        rows = attention_block_rows(chunk, m.config.num_attention_heads, h.shape[1])
        h = h + enc.pos_conv_embed(h)
        stable = bool(m.config.do_stable_layer_norm)
        if not stable:
            h = enc.layer_norm(h)
        owner = enc.layers[0].attention  # owns the bucket table shared by every layer
        for layer in enc.layers:
            if stable:
                h = h + _chunked_attention(layer.attention, owner, layer.layer_norm(h), rows, counter)
                h = h + layer.feed_forward(layer.final_layer_norm(h))
            else:
                h = layer.layer_norm(h + _chunked_attention(layer.attention, owner, h, rows, counter))
                h = layer.final_layer_norm(h + layer.feed_forward(h))
            counter.tick()
        if stable:
            h = enc.layer_norm(h)
        return h


def _chunked_attention(attn, owner, h, chunk, counter: WorkCounter):
    """``WavLMAttention`` (no mask, eval) with the query rows processed ``chunk`` at a time (one unit of work each)."""
    b, t, c = h.shape
    nh, hd = attn.num_heads, attn.head_dim
    # gate from the un-projected layer input, per head (as transformers / unilm WavLM)
    g = attn.gru_rel_pos_linear(h.view(b, t, nh, hd).permute(0, 2, 1, 3)).view(b, nh, t, 2, 4).sum(-1)
    ga, gb = torch.sigmoid(g).chunk(2, dim=-1)
    gate = ga * (gb * attn.gru_rel_pos_const - 1.0) + 2.0  # [B, H, T, 1]
    q = (attn.q_proj(h) * attn.scaling).view(b, t, nh, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, nh, hd).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, nh, hd).transpose(1, 2)
    kpos = torch.arange(t, device=h.device)[None, :]
    outs = []
    for q0, q1 in spans(t, chunk):
        qpos = torch.arange(q0, q1, device=h.device)[:, None]
        bias = owner.rel_attn_embed(owner._relative_positions_bucket(kpos - qpos)).permute(2, 0, 1)  # [H, n, T]
        s = gate[:, :, q0:q1] * bias[None].to(q.dtype) + torch.matmul(q[:, :, q0:q1], k.transpose(-1, -2))
        outs.append(torch.matmul(torch.softmax(s, dim=-1), v))
        counter.tick()
    o = torch.cat(outs, dim=2).transpose(1, 2).reshape(b, t, c)
    return attn.out_proj(o)


def load_wavlm(path, config=None, dtype=None, device=None) -> WavLMEncoder:
    """Load WavLM from a unilm pickle (``{"cfg","model"}``), its safetensors conversion, a Hugging Face
    folder, or a single HF-layout ``.safetensors`` / ``.bin`` (config from ``config`` or a
    ``config.json`` beside it). Returns an eval-mode :class:`WavLMEncoder`."""
    from transformers import WavLMConfig, WavLMModel

    f = read_encoder_file(path, config=config, what="WavLM")
    if f["kind"] == "unilm":
        cfg = f["cfg"]
        if "input_patch_size" in cfg or "patch_embedding.weight" in f["model"]:
            raise CheckpointError(f"{path}: this is a BEATs checkpoint, not WavLM; use load_beats for it")
        hf_config = wavlm_config_from_unilm(cfg)
        normalize = bool(cfg.get("normalize", False))
        model = build_from_config(WavLMModel, hf_config, f["source"], "WavLM", config_name="checkpoint's cfg")
        sd = convert_unilm_state_dict(f["model"], model.state_dict().keys(), f["source"])
    else:
        if f["cfg"].get("model_type", "wavlm") != "wavlm":
            raise CheckpointError(f"{path}: config.json describes a {f['cfg'].get('model_type')!r} model, not WavLM")
        def build(cfg):
            hf_config = WavLMConfig.from_dict(cfg)
            for name in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "layerdrop"):
                setattr(hf_config, name, 0.0)
            return WavLMModel(hf_config)

        normalize = False  # HF feature extractors normalise outside the model; KeyFace feeds raw audio
        model = build_from_config(build, f["cfg"], f["source"], "WavLM")
        sd = hf_encoder_keys(f["model"], f["source"], model.state_dict().keys(), prefix="wavlm.", what="WavLM")
    load_strict(model, sd, f["source"], "WavLM")
    enc = WavLMEncoder(model, normalize=normalize).eval().requires_grad_(False)
    return enc.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else enc

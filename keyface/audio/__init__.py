"""Audio encoders (WavLM Base+, BEATs, wav2vec2) and the per-video-frame feature pipeline."""

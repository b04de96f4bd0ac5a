"""Every limit and tuning knob of the delta codec, in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeltaConfig:
    """Encoder effort and decoder safety limits.

    Encoder fields only change how hard the encoder tries; any patch decodes with
    the defaults of the decoder fields.
    """

    # Encoder: final entropy coding.
    zstd_level: int = 19
    # Encoder: quick level used to rank per-tensor candidates before the final pass.
    probe_level: int = 3
    # Encoder: tensors up to this size are ranked at ``zstd_level`` instead.
    full_probe_bytes: int = 256 * 1024
    # Encoder: zstd window cap for the residual and skeleton streams (2**27 = 128 MiB).
    max_stream_window_log: int = 27
    # Encoder: tensors with at least this many residual bytes get their own zstd
    # frame; smaller ones share one.
    frame_min_bytes: int = 4096
    # Encoder: context sorting must save this many bytes on a tensor to be used (it
    # costs the decoder a sort per chunk, which dominates on tiny tensors).
    sorted_min_gain_bytes: int = 32
    # Encoder: end a zstd block (new Huffman table) after residual pieces this big.
    min_block_bytes: int = 256
    # Encoder: byte-level zstd stays at probe_level when the best patch so far is
    # smaller than this fraction of that quick frame (full effort cannot catch up).
    zstd_skip_ratio: float = 0.5
    # Encoder: skip the bsdiff candidate above this size (base + target): suffix
    # sorting needs ~9x RAM and is superlinear; big models are coded model-aware.
    bsdiff_max_bytes: int = 16 * 1024 * 1024
    # Encoder: code one-byte residuals with per-context ANS models when that is smaller
    # (format version 2; the decoder then needs constriction, which has no aarch64 wheel).
    ans: bool = True
    # Encoder: also measure the per-channel order-0 bound of ANS patches (the bench).
    measure_bound: bool = False
    # Encoder: methods to try ("tflite" applies only when both files parse as .tflite).
    methods: tuple[str, ...] = ("tflite", "zstd", "bsdiff")
    # Encoder: decode every candidate before keeping it (cheap next to encoding).
    self_check: bool = True
    # Decoder: largest zstd window accepted (2**31 = 2 GiB, zstd's 64-bit maximum).
    max_window_log: int = 31
    # Decoder: largest tensor table or bsdiff control stream accepted, in bytes.
    max_table_bytes: int = 64 * 1024 * 1024
    # Decoder: largest target accepted (a patch claiming more is refused up front).
    max_target_bytes: int = 16 * 1024 * 1024 * 1024
    # Both: read and hash files in blocks of this size.
    io_block_bytes: int = 1024 * 1024


DEFAULT_CONFIG = DeltaConfig()

"""Generator of complete local Qwen3-VL checkpoints, and the model fingerprint.

No weights can be downloaded here, so ``make_checkpoint`` writes a directory with everything a real
Qwen3-VL checkpoint has (config.json, safetensors weights, generation_config.json, tokenizer.json,
tokenizer_config.json, chat_template.jinja, preprocessor_config.json, video_preprocessor_config.json)
that loads through the same ``from_pretrained(path, local_files_only=True)`` calls as a real one.
Weights are random but seeded: same preset + seed + torch version -> byte-identical safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from qwen3vl_ray.engine.chat_template import CHAT_TEMPLATE
from qwen3vl_ray.engine.presets import get_preset, preset_config
from qwen3vl_ray.engine.tokenizer_builder import SPECIAL_TOKEN_IDS, build_hf_tokenizer
from qwen3vl_ray.errors import ConfigError

logger = logging.getLogger(__name__)

#: Written last into a finished checkpoint; its presence means "complete".
MANIFEST = "qwen3vl_ray_checkpoint.json"
_FORMAT = 1

# Qwen3-VL's shipped normalisation (not the CLIP mean/std Qwen2-VL used).
_IMAGE_MEAN = [0.5, 0.5, 0.5]
_IMAGE_STD = [0.5, 0.5, 0.5]

# torch's default RNG is process-global: two threads seeding and drawing at once would interleave
# their streams and break "same seed -> same weights".
_RNG_LOCK = threading.Lock()


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a checkpoint this module finished writing."""
    return (Path(path) / MANIFEST).is_file()


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` holds a Qwen3-VL checkpoint the loader accepts, before anything is started for it
    (Ray, workers): a config.json with a supported ``model_type``, ``*.safetensors`` weights, a tokenizer
    (tokenizer.json, or vocab.json + merges.txt) and the image processor's preprocessor_config.json.

    Raises ConfigError with one line naming the first missing piece and what ``--model`` accepts: the
    loader's own failures come much later, from inside a worker, as a C++ stack and an abort.
    """
    from qwen3vl_ray.engine.loading import check_checkpoint

    root = Path(path)
    try:
        check_checkpoint(root)
        missing = None
        if not ((root / "tokenizer.json").is_file() or
                ((root / "vocab.json").is_file() and (root / "merges.txt").is_file())):
            missing = "no tokenizer (tokenizer.json, or vocab.json + merges.txt)"
        elif not (root / "preprocessor_config.json").is_file():
            missing = "no preprocessor_config.json (the image processor's settings)"
        if missing:
            raise FileNotFoundError(f"model path {str(root)!r} has {missing}")
    except (OSError, ConfigError) as e:
        from qwen3vl_ray.engine.presets import PRESETS

        raise ConfigError(f"{e}; --model takes a Qwen3-VL checkpoint directory (config.json, *.safetensors, "
                          f"tokenizer.json, preprocessor_config.json) or a preset ({', '.join(sorted(PRESETS))})"
                          ) from None
    return root


def read_manifest(path: str | os.PathLike) -> dict:
    """The generator's manifest of a complete checkpoint (preset, seed, format)."""
    return json.loads((Path(path) / MANIFEST).read_text())


def make_checkpoint(preset: str, path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a complete checkpoint of ``preset`` to ``path`` and return ``path``.

    Idempotent: a complete checkpoint of the same preset and seed already at ``path`` is reused as is.
    Atomic: everything is written into a temporary sibling directory that is renamed onto ``path``,
    so a crash never leaves a half-written checkpoint behind and concurrent callers agree.
    Raises ConfigError for an unknown preset, a negative seed, or a ``path`` that is a non-empty
    directory holding something else.
    """
    p = get_preset(preset)  # validates the name first
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    path = Path(path)
    existing = _reusable(path, preset, seed)
    if existing:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write(tmp, preset, p, seed)
        _fsync_tree(tmp)
        try:
            if path.exists():  # an empty directory: replace it
                path.rmdir()
            os.rename(tmp, path)
        except OSError:
            # Lost a race with another writer: theirs is as good as ours if it is complete.
            if _reusable(path, preset, seed):
                return path
            raise
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s checkpoint (seed %d) to %s", preset, seed, path)
    return path


def _reusable(path: Path, preset: str, seed: int) -> bool:
    if not path.exists():
        return False
    if not path.is_dir():
        raise ConfigError(f"checkpoint path {str(path)!r} exists and is not a directory")
    if is_complete_checkpoint(path):
        m = read_manifest(path)
        if m.get("preset") == preset and m.get("seed") == seed and m.get("format") == _FORMAT:
            return True
        raise ConfigError(
            f"{str(path)!r} already holds a {m.get('preset')!r} checkpoint with seed {m.get('seed')!r}, "
            f"not {preset!r} with seed {seed}; choose another path"
        )
    if any(path.iterdir()):
        raise ConfigError(
            f"checkpoint path {str(path)!r} is a non-empty directory that is not a generated checkpoint"
        )
    return False


def _write(out: Path, preset: str, p, seed: int) -> None:
    import torch
    import transformers
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    config = preset_config(preset)
    cls = Qwen3VLMoeForConditionalGeneration if p.moe else Qwen3VLForConditionalGeneration
    # Seed a private generator state: weights depend on (preset, seed, torch version) only.
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.to(getattr(torch, p.dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[SPECIAL_TOKEN_IDS["<|im_end|>"], SPECIAL_TOKEN_IDS["<|endoftext|>"]],
        pad_token_id=SPECIAL_TOKEN_IDS["<|endoftext|>"],
        do_sample=False,  # greedy by default, so plain model.generate is a deterministic reference
    )
    model.save_pretrained(out)
    del model

    tokenizer = build_hf_tokenizer(CHAT_TEMPLATE, model_max_length=config.text_config.max_position_embeddings)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja

    vision = config.vision_config
    common = {
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
        "image_mean": _IMAGE_MEAN,
        "image_std": _IMAGE_STD,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "resample": 3,  # bicubic
        "processor_class": "Qwen3VLProcessor",
    }
    image_cfg = {**common, "image_processor_type": "Qwen2VLImageProcessor",
                 "size": {"shortest_edge": p.min_pixels, "longest_edge": p.max_pixels}}
    # Written as JSON rather than via Qwen3VLVideoProcessor.save_pretrained: that class needs
    # torchvision, which this project does not depend on (see loading.py).
    video_cfg = {**common, "video_processor_type": "Qwen3VLVideoProcessor",
                 "size": {"shortest_edge": 4096, "longest_edge": 25165824},
                 "fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True}
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2, sort_keys=True) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2, sort_keys=True) + "\n")

    manifest = {"format": _FORMAT, "preset": preset, "seed": seed, "transformers": transformers.__version__,
                "torch": torch.__version__, "special_token_ids": SPECIAL_TOKEN_IDS}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")  # last: marks complete


def _fsync_tree(root: Path) -> None:
    for f in sorted(root.iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# fingerprint

_SAMPLES_PER_FILE = 64
_SAMPLE_BYTES = 64 << 10
_fingerprint_memo: dict[tuple, str] = {}
FINGERPRINT_MEMO_DIR = "~/.cache/qwen3vl-ray/fingerprints"
"""Where full fingerprints are remembered between processes (one small JSON file per checkpoint)."""


def model_fingerprint(path: str | os.PathLike, *, full: bool = False,
                      memo_dir: str | os.PathLike | None = FINGERPRINT_MEMO_DIR) -> str:
    """A 32-hex-digit id of the model weights + architecture, for the cache key namespace.

    Covers config.json, every ``*.safetensors`` file's name, size and header (tensor names, dtypes,
    shapes) and its data: every byte with ``full=True`` (what the engine uses by default), else 64 evenly
    spaced 64 KiB samples per file (cheap, yet different for any two checkpoints whose weights differ
    broadly; two that differ only between the samples, e.g. a fine-tune of one small module, would collide).
    Tokenizer and processor files are left out on purpose: cached KV depends on token ids and pixels, which
    the keys already carry.

    Memoised per (path, file sizes, mtimes, inodes, ctimes) in this process; a full fingerprint is also remembered in
    ``memo_dir`` (JSON, 0700 directory; None disables), so each checkpoint version is hashed once per machine.
    """
    root = Path(path)
    cfg = root / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint path {str(root)!r}")
    weights = sorted(root.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors weights in checkpoint path {str(root)!r}")
    # inode and ctime too: tools that copy or replace weights in place can keep size and mtime (cp -p,
    # rsync -a, fixed-mtime image builds) but not the ctime, which only the kernel sets
    stats = [[f.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
             for f in [cfg, *weights] for st in [f.stat()]]
    memo_key = (str(root.resolve()), full, repr(stats))
    if memo_key in _fingerprint_memo:
        return _fingerprint_memo[memo_key]
    memo_file = _memo_file(memo_dir, root) if full and memo_dir is not None else None
    fp = _read_memo(memo_file, stats) if memo_file is not None else None
    if fp is None:
        fp = _hash_checkpoint(cfg, weights, full)
        if memo_file is not None:
            _write_memo(memo_file, stats, fp)
    _fingerprint_memo[memo_key] = fp
    return fp


def _hash_checkpoint(cfg: Path, weights: list[Path], full: bool) -> str:
    h = hashlib.blake2b(digest_size=16, person=b"q3vl-model-fp1")
    h.update(cfg.read_bytes())
    for f in weights:
        size = f.stat().st_size
        h.update(f"\0{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(header_len, size)))
            data_start = 8 + header_len
            span = max(size - data_start, 0)
            if full or span <= _SAMPLES_PER_FILE * _SAMPLE_BYTES:
                for block in iter(lambda: fh.read(8 << 20), b""):
                    h.update(block)
            else:
                for i in range(_SAMPLES_PER_FILE):  # the first and last samples touch both ends
                    fh.seek(data_start + (span - _SAMPLE_BYTES) * i // (_SAMPLES_PER_FILE - 1))
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _memo_file(memo_dir: str | os.PathLike, root: Path) -> Path:
    # the checkpoint's path becomes a file name only as a hash: no path can name anything outside memo_dir
    name = hashlib.blake2b(str(root.resolve()).encode(), digest_size=16).hexdigest()
    return Path(os.path.expanduser(str(memo_dir))) / f"{name}.json"


def _read_memo(memo_file: Path, stats: list) -> str | None:
    try:
        data = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    fp = data.get("fingerprint")
    if data.get("stats") != stats or not isinstance(fp, str) or len(fp) != 32 or not all(c in "0123456789abcdef" for c in fp):
        return None  # another version of the checkpoint (its files' metadata changed), or not ours
    return fp


def _write_memo(memo_file: Path, stats: list, fp: str) -> None:
    try:
        memo_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stats": stats, "fingerprint": fp}))
        os.replace(tmp, memo_file)
    except OSError as exc:  # a read-only home: hash again next time, never fail the load
        logger.info("cannot remember the fingerprint in %s: %s", memo_file.parent, exc)

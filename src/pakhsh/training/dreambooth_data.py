"""DreamBooth's data: the subject's prompts (its captions, checked for the identifier), notices for prompts that
lack the class noun or the identifier, and the class images of prior preservation, generated once by the frozen
base and cached by its fingerprint. The training system is in `training/dreambooth.py`."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import Tensor

from .dreambooth_base import DreamBoothError
from .experiment import DreamBoothConfig, ExperimentConfig, has_word


# ---------------------------------------------------------------------------------------------- prompts, token
def _shapes_words() -> set[str]:
    from ..data.builtin.shapes import _POSITION_PHRASES, COLOR_NAMES, SHAPES, SIZES

    words = {"a", "an", "and", "on", "background", *SHAPES, *COLOR_NAMES, *SIZES}
    for phrase in _POSITION_PHRASES:
        words.update(phrase.split())
    return words


def check_token(db: DreamBoothConfig, base_cfg: ExperimentConfig) -> None:
    """The identifier must be a word the base does not already use: a shapes base knows its caption words."""
    if base_cfg.data.name == "shapes" and db.token.lower() in _shapes_words():
        raise DreamBoothError(f"--token {db.token}: the base was trained on captions using that word; pick a rare "
                              "word it never saw, e.g. sks")


def subject_prompts(dataset: Any, db: DreamBoothConfig, root: str | None = None) -> list[str]:
    """Each subject image's prompt: its own caption (NAME.txt / captions.jsonl) where it has one, else the instance
    prompt. A caption without the token is an error naming the file: the subject would be learnt without its
    identifier, i.e. as the plain class."""
    captions = getattr(dataset, "captions", None)
    paths = getattr(dataset, "paths", None)
    out = []
    for i in range(len(dataset)):
        text = captions[i] if captions is not None and captions[i].strip() else db.instance
        if not has_word(text, db.token):
            where = str(paths[i]) if paths is not None else f"subject image {i}"
            raise DreamBoothError(f"{where}: its caption {text!r} lacks the token {db.token!r}; write the identifier "
                                  f"into every caption (e.g. \"a {db.token} {db.class_noun} ...\")")
        out.append(text)
    return out


def class_noun_notice(prompts: list[str], noun: str, what: str) -> str | None:
    """A notice naming the prompts that lack the class noun (the paper pairs the identifier with it: without it the
    model must tie the subject's whole appearance to the rare token alone)."""
    lacking = [p for p in dict.fromkeys(prompts) if not has_word(p, noun)]
    if not lacking:
        return None
    shown = "; ".join(repr(p) for p in lacking[:3]) + (" ..." if len(lacking) > 3 else "")
    return f"{what} lacks the class noun {noun!r}: {shown}"


def token_notice(cfg: ExperimentConfig | None, prompts: list[str]) -> str | None:
    """For `pakhsh generate` with a DreamBooth model: prompts that do not name the subject's identifier draw the plain
    class, which is allowed but usually not what was meant."""
    db = getattr(cfg, "dreambooth", None)
    if db is None:
        return None
    lacking = list(dict.fromkeys(p for p in prompts if p and not has_word(p, db.token)))
    if not lacking:
        return None
    shown = "; ".join(repr(p) for p in lacking[:3]) + (" ..." if len(lacking) > 3 else "")
    return (f"{shown} lack{'s' * (len(lacking) == 1)} the identifier {db.token!r} this model learnt its subject "
            f"under, so {'it draws' if len(lacking) == 1 else 'they draw'} the plain class (the subject: "
            f"\"{db.instance} ...\")")


# ---------------------------------------------------------------------------------------------- class images
def class_cache_key(fingerprint: str, db: DreamBoothConfig, prompts: list[str], image_size: int) -> str:
    return hashlib.sha256(json.dumps([fingerprint, prompts, db.class_images, db.class_seed, db.class_steps,
                                      db.class_guidance, image_size, "ddim"]).encode()).hexdigest()[:24]


def class_image_prompts(prompts: list[str], count: int) -> list[str]:
    """Class image i's prompt: prompts[i mod P] (so K a multiple of S pairs each subject image, item j -> subject
    j mod S and class j mod K, with class images of its own prompt)."""
    return [prompts[i % len(prompts)] for i in range(count)]


def class_images(model: Any, db: DreamBoothConfig, prompts: list[str], fingerprint: str, image_size: int,
                 device: torch.device, progress: bool = True) -> tuple[Tensor, bool]:
    """(uint8 (K, 3, H, W) class images, whether they came from the cache). Image i is the frozen base's DDIM
    sample of class_image_prompts(prompts)[i] from noise seeded by (class_seed, i); the set is cached under the
    pakhsh cache, keyed by the base's fingerprint, the prompts, the count and the sampling settings (a damaged file
    is redone)."""
    from safetensors.torch import load_file, save_file

    from ..config import cache_root
    from ..pipelines.text_to_image import TextToImagePipeline
    from ..pipelines.unconditional import SampleSettings

    path = cache_root() / "dreambooth" / f"class_{class_cache_key(fingerprint, db, prompts, image_size)}.safetensors"
    if path.is_file():
        try:
            found = load_file(str(path))["images"]
            if found.shape[0] == db.class_images and found.dtype == torch.uint8:
                return found, True
        except Exception:  # a damaged cache file is regenerated, never trusted
            pass
    pipe = TextToImagePipeline(model, device=device, spacing="pakhsh")
    settings = SampleSettings("ddim", db.class_steps, guidance=db.class_guidance)
    x = pipe.generate(class_image_prompts(prompts, db.class_images), None, settings, seed=db.class_seed,
                      batch_size=16, progress=progress)
    images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        save_file({"images": images}, str(tmp), metadata={"prompts": json.dumps(prompts),
                                                            "base_fingerprint": fingerprint})
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache only costs the next run this generation
        pass
    return images, False

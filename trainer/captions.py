"""What each sample's caption is at each step: the trigger word first, then the caption's tags, shuffled and
dropped as the data config says, as pure functions of (seed, epoch, slot) like every other draw, so 1 process
and N processes, and a resumed run, train on the same captions.

How the text encoding stays right (trainer/encode.py, loop.py): dropout alone has two encodings per picture,
its caption's and the empty caption's, both cached; shuffling makes a new caption nearly every step, so the
captions are then encoded every step, as when a text encoder trains.
"""

from __future__ import annotations

import torch

from .config import DataConfig
from .schedule import generator

TAG_SEPARATOR = ","


def with_trigger(caption: str, trigger_word: str) -> str:
    """The caption with the trigger word as its first tag."""
    trigger = trigger_word.strip()
    if not trigger:
        return caption
    return f"{trigger}{TAG_SEPARATOR} {caption}" if caption else trigger


def kept_tags(data: DataConfig) -> int:
    """The leading tags shuffling leaves in place: `keep_tags`, and the trigger word (kohya's keep_tokens)."""
    return data.keep_tags + (1 if data.trigger_word.strip() else 0)


def caption_at(caption: str, data: DataConfig, seed: int, epoch: int, slot: int) -> str:
    """The caption a sample trains with: "" when dropped, its tags shuffled behind the kept leading ones when
    shuffling, else the caption as written (so the cached encoding applies)."""
    g = generator(seed, epoch, 5, slot)  # stream 5: apart from the noise/timestep/flip draw (schedule.draw)
    if data.caption_dropout and float(torch.rand(1, generator=g)) < data.caption_dropout:
        return ""
    if not data.shuffle_tags:
        return caption
    tags = [tag.strip() for tag in caption.split(TAG_SEPARATOR) if tag.strip()]
    kept = kept_tags(data)
    head, tail = tags[:kept], tags[kept:]
    order = torch.randperm(len(tail), generator=g).tolist()
    return f"{TAG_SEPARATOR} ".join(head + [tail[i] for i in order])

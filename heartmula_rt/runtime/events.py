"""What a front end hears of the songs the runner makes (runner.py): torch-free, so that the
command line can define its view of them before any model loads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from heartmula_rt.runtime.runner import Song


class SongEvents:
    """What a front end hears of its songs; every method does nothing unless overridden.
    `frames` and `lm_ended` come from the engine's thread, `audio`, `window` and `written` from
    the codec's."""

    def frames(self, song: Song, new: torch.Tensor) -> None:
        """`new` [8, k] frames of `song` were made (`song.made` counts them)."""

    def lm_ended(self, song: Song) -> None:
        """The song's LM part ended (`song.ended`), its codes kept in its sidecar."""

    def audio(self, song: Song, piece: np.ndarray) -> None:
        """A live song's next float32 [2, n] piece of audio."""

    def window(self, song: Song, done: int, total: int) -> None:
        """A whole song's codec window `done` of `total` was decoded."""

    def written(self, song: Song) -> None:
        """A song's audio is decoded (written to its output, or kept in `wav`)."""

    def lm_finished(self) -> None:
        """The LM made every song of a batch (`SongRunner.run`); the codec may still work."""

    def interrupted(self, started: Sequence[Song]) -> None:
        """Ctrl-C in the LM: `started` songs (ended or cut) are decoded next."""

"""Progressive resizing: the training image size of each epoch.

ffcv-imagenet's `get_resolution` (train_imagenet.py @ 606c584, l.168-185, set once before each
epoch, l.297-300): `min_res` up to and including epoch `start_ramp`, `max_res` from epoch
`end_ramp` on, and in between the linear interpolation rounded to the nearest multiple of 32
(np.round: half to even, so 176 -> 192 and 208 -> 192). min_res and max_res themselves are used
as given. A pure function of the epoch, so a resumed run trains each epoch at the size the
uninterrupted run would have used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ResolutionSchedule:
    min_res: int
    max_res: int
    start_ramp: int = 0
    end_ramp: int = 0

    @classmethod
    def from_args(cls, args) -> "ResolutionSchedule":
        """--min-res/--max-res/--start-ramp/--end-ramp, or --img-size throughout."""
        if args.min_res is None:
            return cls(args.img_size, args.img_size)
        return cls(args.min_res, args.max_res, args.start_ramp, args.end_ramp)

    @property
    def progressive(self) -> bool:
        return self.min_res != self.max_res

    @property
    def largest(self) -> int:
        return self.max_res

    def at(self, epoch: int) -> int:
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        interp = np.interp([epoch], [self.start_ramp, self.end_ramp], [self.min_res, self.max_res])
        return int(np.round(interp[0] / 32)) * 32

    def sizes(self, epochs: int) -> list[int]:
        """The distinct sizes of epochs 0..epochs-1, smallest first."""
        return sorted({self.at(e) for e in range(epochs)})

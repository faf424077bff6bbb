"""Backdoor triggers: seeded, vectorised transforms of pixel-space image batches.

Build one for an image shape from a spec string or a saved config::

    trigger = build_trigger("badnets-square:size=3,corner=top-left", image_shape=(3, 32, 32))
    poisoned = trigger(images)            # (N, 3, 32, 32) floats in [0, 1] -> same shape
    same = build_trigger(trigger.config())

Spec strings: ``NAME`` or ``NAME:key=value,key=value``; image files are
``image:PATH?key=value&key=value`` (PATH may not contain '?'). ``describe_syntax()`` lists
every trigger with its defaults. Lengths of patch triggers are pixels at 32×32, scaled per
axis with floor(length · side / 32 + 0.5) (at least 1 px for sizes).

ABD's trigger files (Trap-and-Replace) are reproduced with:
    blend.png, sig.png           image:FILE?mode=blend&alpha=0.2
    trojan_wm.png, trojan_3x3.png, trojan_8x8.png, l2_inv.png    image:FILE?mode=add
    l0_inv.png + mask.npy        image:l0_inv.png?mode=mask&mask=mask.npy
    smooth_cifar10.png, smooth_gtsrb.png    image:FILE?mode=add-renormalize
and ABD's badnet_sq, badnet_grid, cl are the defaults of badnets-square, badnets-grid,
clean-label. ABD truncates its float results to uint8; ours stay float, less than one
8-bit level (1/255) above ABD's stored values (see ``image``).
"""

# Importing the trigger modules registers them.
from kdbackdoor.triggers import (  # noqa: F401
    badnets,
    blend,
    clean_label,
    image,
    invisible,
    sig,
    smooth,
    trojan,
    wanet,
)
from kdbackdoor.triggers.base import ImageShape, Trigger, TriggerParams
from kdbackdoor.triggers.overlay import OverlayTrigger
from kdbackdoor.triggers.registry import available_triggers, register_trigger
from kdbackdoor.triggers.show import render_trigger_grid
from kdbackdoor.triggers.spec import build_trigger, describe_syntax, parse_spec

__all__ = [
    "ImageShape",
    "OverlayTrigger",
    "Trigger",
    "TriggerParams",
    "available_triggers",
    "build_trigger",
    "describe_syntax",
    "parse_spec",
    "register_trigger",
    "render_trigger_grid",
]

"""``source``: the trained model as it is, in eval mode (BN normalizes with its training running statistics)."""

from repro.adapt.base import AdaptationMethod, register_method


@register_method("source")
class Source(AdaptationMethod):
    """No adaptation: the baseline every other method is compared with."""

    batch_independent = True
    forward_only = True

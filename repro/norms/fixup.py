"""Fixup (Zhang, Dauphin & Ma, ICLR 2019, arXiv 1901.09321) on timm ResNets: no normalization layer at all.

The paper's recipe, with the placement of the official code (paper_numbers.md §2b):

1. the classifier and the last conv of each residual branch start at 0;
2. the other convs use He init with fan-out; inside a branch of ``m`` convs they are scaled by
   ``L**(-1/(2m-2))``, ``L`` = number of residual branches (blocks); projection shortcuts are not scaled;
3. a scalar bias (init 0) before each conv, the classifier and each element-wise activation, and one scalar
   multiplier (init 1) per branch, before the branch's last bias.

A BasicBlock (m = 2) computes ``relu(x + b1a -> conv1 -> + b1b -> relu -> + b2a -> conv2 -> * scale + b2b
+ shortcut)``, a Bottleneck (m = 3) the same with a third conv; a projection shortcut sees ``x + b1a``. The stem
becomes ``act(conv(x) + bias)`` (every stem BN of a deep stem becomes a scalar bias) and the head
``fc(pool(x) + bias)``.

Choices where the official code is silent or differs: stem convs get He fan-out init too (the paper's "standard
method"; the official code leaves PyTorch's default); the classifier's own per-class bias is trained at the base
learning rate (the official code's name match on 'bias' also puts it in the lr/10 group). The scalars are trained
at ``scalar_lr_factor`` (0.1) times the learning rate with the same weight decay as every other parameter, as in
the official code. Mixup, which the paper pairs with Fixup, is the trainer's ``mixup_alpha``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from repro.errors import UserError
from repro.norms.base import Normalizer, register_normalizer, replace_batchnorms, set_submodule


class ScalarBias(nn.Module):
    """``x + b`` with one learnable scalar ``b``, initialised to 0."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class FixupBlock(nn.Module):
    """A timm BasicBlock or Bottleneck without norms, with Fixup's scalar biases and multiplier.

    The convs, activations and shortcut are the timm block's own modules.
    """

    def __init__(self, convs: list[nn.Conv2d], inner_acts: list[nn.Module], out_act: nn.Module,
                 shortcut: nn.Module | None) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.inner_acts = nn.ModuleList(inner_acts)
        self.out_act = out_act
        self.shortcut = shortcut
        self.bias_before_conv = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in convs])
        self.bias_before_act = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in inner_acts])
        self.scale = nn.Parameter(torch.ones(1))
        self.bias_out = nn.Parameter(torch.zeros(1))

    @classmethod
    def from_timm(cls, name: str, block: BasicBlock | Bottleneck) -> FixupBlock:
        extras = {"se": block.se, "aa": block.aa, "drop_block": block.drop_block, "drop_path": block.drop_path}
        used = [key for key, module in extras.items() if module is not None and not isinstance(module, nn.Identity)]
        if used:
            raise UserError(f"fixup: block {name} uses {', '.join(used)}, which Fixup does not define")
        if isinstance(block, BasicBlock):
            convs, inner_acts, out_act = [block.conv1, block.conv2], [block.act1], block.act2
        else:
            convs, inner_acts, out_act = [block.conv1, block.conv2, block.conv3], [block.act1, block.act2], block.act3
        shortcut = None
        if block.downsample is not None:
            shortcut = nn.Sequential(*(m for m in block.downsample if not isinstance(m, nn.BatchNorm2d)))
        return cls(convs, inner_acts, out_act, shortcut)

    def scalars(self) -> list[nn.Parameter]:
        return [*self.bias_before_conv, *self.bias_before_act, self.scale, self.bias_out]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch; exactly 0 at init because its last conv is 0."""
        for index, conv in enumerate(self.convs):
            x = conv(x + self.bias_before_conv[index])
            if index < len(self.inner_acts):
                x = self.inner_acts[index](x + self.bias_before_act[index])
        return x * self.scale + self.bias_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x + self.bias_before_conv[0])
        return self.out_act(self.branch(x) + shortcut)


def scalar_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Fixup's scalar biases and multipliers (the lr/10 group)."""
    scalars: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, FixupBlock):
            scalars += module.scalars()
        elif isinstance(module, ScalarBias):
            scalars.append(module.bias)
    return scalars


@torch.no_grad()
def initialize(model: nn.Module, blocks: list[FixupBlock], classifier: nn.Linear) -> None:
    """Fixup init: He fan-out everywhere, branch convs scaled by L^(-1/(2m-2)), branch ends and classifier 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    num_branches = len(blocks)
    for block in blocks:
        depth = len(block.convs)
        for conv in block.convs[:-1]:
            conv.weight.mul_(num_branches ** (-1 / (2 * depth - 2)))
        block.convs[-1].weight.zero_()
    classifier.weight.zero_()
    classifier.bias.zero_()


@register_normalizer("fixup")
class Fixup(Normalizer):
    """Fixup initialization and scalar biases/multipliers in place of every BatchNorm of a timm ResNet."""

    micro_batches_in_one_pass = True
    invariant_to = frozenset({"train.micro_batch"})

    def __init__(self, scalar_lr_factor: float = 0.1) -> None:
        """
        Args:
            scalar_lr_factor: learning rate of the scalars relative to the base rate (the official code's 1/10).
        """
        if scalar_lr_factor <= 0:
            raise UserError(f"fixup: scalar_lr_factor must be positive, got {scalar_lr_factor}")
        self.scalar_lr_factor = scalar_lr_factor

    def apply(self, model: nn.Module) -> nn.Module:
        if not isinstance(model, ResNet):
            raise UserError(f"fixup is defined for residual networks; {type(model).__name__} is not a timm ResNet")
        classifier = model.fc
        if not isinstance(classifier, nn.Linear):
            raise UserError("fixup needs the ResNet's linear classifier (num_classes > 0)")
        blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicBlock | Bottleneck)]
        fixup_blocks = []
        for name, block in blocks:
            fixup_blocks.append(FixupBlock.from_timm(name, block))
            set_submodule(model, name, fixup_blocks[-1])
        replace_batchnorms(model, lambda name, bn: ScalarBias())  # the stem's norms: a bias before its activation
        model.fc = nn.Sequential(ScalarBias(), classifier)
        initialize(model, fixup_blocks, classifier)
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        scalars = scalar_parameters(model)
        scalar_ids = {id(p) for p in scalars}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in scalar_ids]
        return [
            {"params": others, "lr": lr, "weight_decay": weight_decay},
            {"params": scalars, "lr": lr * self.scalar_lr_factor, "weight_decay": weight_decay},
        ]

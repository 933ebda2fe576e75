"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021): BN statistics pooled over the last k iterations.

Statistics of earlier iterations were computed under earlier weights; CBN moves them to the current weights of
the convolution that feeds the BN with a first-order Taylor term in that weight only (paper_numbers.md §3c):

    μ_{t−τ}(W_t) ≈ μ_{t−τ} + ρ·Σ ∂μ_{t−τ}/∂W ⊙ (W_t − W_{t−τ}),   likewise for ν = E[y²].

Design decisions (see also the class docstrings):

* The gradients are computed in closed form, not with autograd: μ_c is linear in filter c, so ∂μ_c/∂W_c is the
  mean input patch (two strided sums of the batch-summed input), and ∂ν_c/∂W_c = E[2·y_c·patch] is the conv's own
  weight gradient for grad_output 2y/M (one ``convolution_backward``). The official code runs two autograd
  backward passes through the conv with a retained graph instead. Extra cost per layer and step: one
  weight-gradient convolution (on CPU about half the cost of the conv's whole backward) plus one batched product
  of the stored gradients with the current weight; ``repro.train.timing.measure_step_time`` measures it.
* Σ ∂ν/∂W ⊙ (W_t − W_{t−τ}) is evaluated as ⟨∂ν/∂W, W_t⟩ − ⟨∂ν/∂W, W_{t−τ}⟩, so no copies of old weights are
  kept; the second term needs no product at all: with y_c = ⟨W_c, patch⟩ + b_c it is 2·(ν_c − b_c·μ_c), and
  ⟨∂μ_c/∂W_c, W_{t−τ}⟩ is μ_c − b_c.
* Few operations per layer, whatever the window or the number of micro-batches: each layer keeps its windows in
  fixed tensors written in turn (``_Windows``), and the batch moments, the pooling and the normalization are one
  autograd function with a closed-form backward pass (``_PooledBatchNorm``; one BatchNorm inference kernel
  normalizes a single group).
* Biased variance in every path (ν − μ² in the window, like ``nn.BatchNorm2d`` outside it); the official plain-BN
  path normalizes with the unbiased one. Running statistics are BN's (current batch, unbiased variance).
* Past statistics are constants for backpropagation; gradients flow through the current batch's statistics.
* One window per micro-batch position within an optimizer step, so that the one-process micro-batch simulation
  keeps exactly the statistics each data-parallel rank would keep.

Modules, one concept each: ``taylor`` (the statistics' gradients in closed form), ``pooled`` (the autograd
function ``_PooledBatchNorm``), ``window`` (``_Windows`` and the layout of the saved training state), ``layer``
(``CrossIterationBatchNorm2d`` and the registered normalizers ``cbn`` and ``cbn_naive``).
"""

from repro.norms.cbn.layer import CrossIterationBatchNorm, CrossIterationBatchNorm2d, NaiveCrossIterationBatchNorm
from repro.norms.cbn.pooled import _PooledBatchNorm
from repro.norms.cbn.taylor import statistics_gradients
from repro.norms.cbn.window import _Windows

__all__ = [
    "CrossIterationBatchNorm",
    "CrossIterationBatchNorm2d",
    "NaiveCrossIterationBatchNorm",
    "_PooledBatchNorm",
    "_Windows",
    "statistics_gradients",
]

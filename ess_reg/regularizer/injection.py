"""The identity autograd node through which attached mode adds a penalty's gradient."""

from __future__ import annotations

import torch


class _InjectPenalty(torch.autograd.Function):
    """Identity on a module's output whose backward adds a penalty's gradient to the operator's
    tensors (computed then, on their device, and scaled like the loss under a GradScaler)."""

    @staticmethod
    def forward(ctx, penalty, regularizer, output, *tensors):
        ctx.penalty, ctx.regularizer = penalty, regularizer
        ctx.save_for_backward(*tensors)
        return output.clone()  # a view would forbid in-place ops on the module's output

    @staticmethod
    def backward(ctx, grad_output):
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        scale = ctx.regularizer._grad_scale()
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            # scaled like the loss before it reaches low-precision leaves, so small gradients
            # survive float16 as a loss-term penalty's would
            grads = iter(torch.autograd.grad(ctx.penalty(leaves) * scale, wanted, allow_unused=True)
                         if wanted else ())
        out = [next(grads) if leaf.requires_grad else None for leaf in leaves]
        return (None, None, grad_output, *out)
